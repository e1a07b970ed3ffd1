"""htable's DMQ wire format (Kamailio ``ht_dmq.c``), byte for byte; no I/O.

Bodies are JSON as Kamailio's srjson prints it: no spaces, keys in a fixed order, integers as
plain decimals, strings escaped like cJSON (``\\"``, ``\\\\``, ``\\b\\f\\n\\r\\t``, other control
characters as ``\\u00xx``; ``/`` and non-ASCII bytes raw). See dmq-protocol.md §7.1.

Single-action messages, keys in this order (golden captures 05, 07, 08)::

    {"action":2,"htname":"t","cname":"k1","type":2,"strval":"v1","mode":1}    SET_CELL (string)
    {"action":2,"htname":"t","cname":"n1","type":0,"intval":42,"mode":1}      SET_CELL (integer)
    {"action":3,"htname":"t","cname":"k2","type":0,"intval":3600,"mode":0}    SET_CELL_EXPIRE
    {"action":4,"htname":"t","cname":"k3","mode":0}                           DEL_CELL
    {"action":5,"htname":"t","type":2,"strval":"^a.*","mode":0}               RM_CELL_RE (mode 1:
    {"action":6,"htname":"t","type":2,"strval":"b","mode":0}                  RM_CELL_SW  by value)
    {"action":1}  /  {"action":1,"htname":"t"}                                 SYNC request

Sync answers (capture 09) carry cells with absolute expiry epochs; the receiver recognises them
only when ``cells`` is the first key::

    {"cells":[{"htname":"t","cname":"n1","type":0,"intval":42,"expire":0},...]}

:func:`decode` reads what a peer sent, checks *everything* before anything is applied, and raises
:class:`BadRequest` (answered ``400 Bad Request``) for what Kamailio 5.6.3 rejects or would crash
on: no body, not JSON, no root member (``{}``, ``[]``), an unknown key in a single action, a
value of the wrong JSON type. An unknown action or table is not decided here: the caller answers
those ``500 Server Internal Error`` as Kamailio does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from pydmq.consumers.htable_store import AVP_VAL_STR, INT_MAX, INT_MIN, Value, check_str

__all__ = [
    "ACTION_DEL_CELL",
    "ACTION_NONE",
    "ACTION_RM_CELL_RE",
    "ACTION_RM_CELL_SW",
    "ACTION_SET_CELL",
    "ACTION_SET_CELL_EXPIRE",
    "ACTION_SYNC",
    "CONTENT_TYPE",
    "EMPTY_GROUP",
    "GROUP_OVERHEAD",
    "Action",
    "BadRequest",
    "Bulk",
    "SyncCell",
    "decode",
    "decode_set_cell",
    "encode_del_cell",
    "encode_remove",
    "encode_set_cell",
    "encode_set_expire",
    "encode_sync_cell",
    "encode_sync_request",
    "group_body",
    "iter_groups",
]

ACTION_NONE = 0
ACTION_SYNC = 1
ACTION_SET_CELL = 2
ACTION_SET_CELL_EXPIRE = 3
ACTION_DEL_CELL = 4
ACTION_RM_CELL_RE = 5
ACTION_RM_CELL_SW = 6

CONTENT_TYPE = "application/json"
#: The final (here: empty) group of a sync answer, as in capture 04.
EMPTY_GROUP = b'{"cells":[]}'
#: ``{"cells":[`` + ``]}``: bytes of a group besides its cells and the commas between them.
GROUP_OVERHEAD = len(EMPTY_GROUP)

#: The keys a 5.6.3 receiver accepts in a single-action message; any other one gives 400.
SINGLE_KEYS = frozenset({"action", "htname", "cname", "type", "strval", "intval", "mode"})
_CELL_KEYS = frozenset({"htname", "cname", "type", "strval", "intval", "expire"})
_STR_KEYS = frozenset({"htname", "cname", "strval"})


def _j(text: str) -> str:
    """A JSON string literal as srjson prints it (ensure_ascii=False escaping is the same)."""
    out: str = encode_basestring(text)
    return out


def _wire(text: str) -> bytes:
    return check_str(text)


# ---- encoding ------------------------------------------------------------------------------


def encode_set_cell(htname: str, cname: str, value: Value) -> bytes:
    """SET_CELL with mode 1, as ``$sht(t=>k) = v``, ``htable.sets/seti`` and ``$shtinc`` send."""
    if isinstance(value, str):
        typed = f'"type":{AVP_VAL_STR},"strval":{_j(value)}'
    else:
        typed = f'"type":0,"intval":{int(value)}'
    return _wire(f'{{"action":2,"htname":{_j(htname)},"cname":{_j(cname)},{typed},"mode":1}}')


def encode_set_expire(htname: str, cname: str, seconds: int) -> bytes:
    """SET_CELL_EXPIRE: ``intval`` is relative seconds (<= 0 = never), mode 0."""
    return _wire(
        f'{{"action":3,"htname":{_j(htname)},"cname":{_j(cname)},"type":0,"intval":{int(seconds)},'
        '"mode":0}'
    )


def encode_del_cell(htname: str, cname: str) -> bytes:
    """DEL_CELL, mode 0."""
    return _wire(f'{{"action":4,"htname":{_j(htname)},"cname":{_j(cname)},"mode":0}}')


def encode_remove(htname: str, pattern: str, *, prefix: bool, by_value: bool) -> bytes:
    """RM_CELL_RE (regex) or RM_CELL_SW (``prefix``); mode 0 matches names, 1 string values."""
    action = ACTION_RM_CELL_SW if prefix else ACTION_RM_CELL_RE
    return _wire(
        f'{{"action":{action},"htname":{_j(htname)},"type":{AVP_VAL_STR},"strval":{_j(pattern)},'
        f'"mode":{1 if by_value else 0}}}'
    )


def encode_sync_request(htname: str | None = None) -> bytes:
    """``{"action":1}``; with ``htname`` the 5.8+ form (5.6.3 accepts it and syncs all)."""
    if htname:
        return _wire(f'{{"action":1,"htname":{_j(htname)}}}')
    return b'{"action":1}'


def encode_sync_cell(htname: str, cname: str, value: Value, expire: int) -> bytes:
    """One element of a sync group; ``expire`` is the absolute epoch (0 = never)."""
    if isinstance(value, str):
        typed = f'"type":{AVP_VAL_STR},"strval":{_j(value)}'
    else:
        typed = f'"type":0,"intval":{int(value)}'
    return _wire(f'{{"htname":{_j(htname)},"cname":{_j(cname)},{typed},"expire":{int(expire)}}}')


def group_body(cells: Iterable[bytes]) -> bytes:
    """``{"cells":[...]}`` around encoded cells."""
    return b'{"cells":[' + b",".join(cells) + b"]}"


def iter_groups(cells: Iterable[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """Pack encoded cells into bodies of at most ``limit`` bytes: ``(body, cell count)``.

    The input is consumed lazily, one group at a time, so a generator reading the live table
    sees each cell as it is when its group is built. A cell that alone exceeds ``limit`` gets a
    group of its own (the caller decides whether that can be sent). Nothing is yielded for no
    cells: the caller sends the final group itself.
    """
    batch: list[bytes] = []
    size = GROUP_OVERHEAD
    for cell in cells:
        extra = len(cell) + (1 if batch else 0)
        if batch and size + extra > limit:
            yield group_body(batch), len(batch)
            batch, size, extra = [], GROUP_OVERHEAD, len(cell)
        batch.append(cell)
        size += extra
    if batch:
        yield group_body(batch), len(batch)


# ---- decoding ------------------------------------------------------------------------------


class BadRequest(ValueError):
    """The body is not something a 5.6.3 receiver accepts: answer ``400 Bad Request``."""


@dataclass(frozen=True, slots=True)
class Action:
    """A single-action message. Absent keys are None (Kamailio's defaults: action 0, type 0,
    mode 0)."""

    action: int
    htname: str | None = None
    cname: str | None = None
    type: int = 0
    strval: str | None = None
    intval: int | None = None
    mode: int = 0

    @property
    def is_str(self) -> bool:
        return bool(self.type & AVP_VAL_STR)

    def value(self) -> Value:
        """The cell value by ``type``; BadRequest when the matching key is missing."""
        if self.is_str:
            if self.strval is None:
                raise BadRequest("type 2 (string) without strval")
            return self.strval
        if self.intval is None:
            raise BadRequest("type 0 (integer) without intval")
        return self.intval


@dataclass(frozen=True, slots=True)
class SyncCell:
    """One cell of a sync group; ``expire`` is an absolute epoch, 0 = none."""

    htname: str
    cname: str
    value: Value
    expire: int


@dataclass(frozen=True, slots=True)
class Bulk:
    """A sync group: the cells to apply, and how many were skipped (no table or cell name),
    plus the unknown keys seen (Kamailio only warns about those)."""

    cells: tuple[SyncCell, ...]
    skipped: int = 0
    unknown_keys: frozenset[str] = frozenset()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(strict=False, parse_constant=_reject_constant)
#: cJSON skips every byte <= 32 before a value.
_LEADING = "".join(chr(i) for i in range(33))


def _number(key: str, value: object) -> int:
    """A JSON number as Kamailio reads it: ``(int)valuedouble``; must fit a C int."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number, not {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{key} is not finite")
        value = int(value)  # truncates toward zero, like the C cast
    if not INT_MIN <= value <= INT_MAX:
        raise BadRequest(f"{key} = {value} does not fit a 32-bit integer")
    return value


def _string(key: str, value: object, escapes: bool = True) -> str:
    """A JSON string. Only a ``\\u`` escape can produce text that cannot go back out as bytes
    (a lone surrogate); bodies without one skip that check (``escapes=False``)."""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, not {type(value).__name__}")
    if escapes:
        try:
            check_str(value)
        except ValueError:
            raise BadRequest(f"{key} is not valid UTF-8 text") from None
    return value


def _load(body: bytes) -> dict[str, Any]:
    text = body.decode("utf-8", "surrogateescape").lstrip(_LEADING)
    try:
        # raw_decode: trailing bytes after the value are ignored, as srjson_Parse does
        root, _end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"invalid json doc: {exc}") from None
    if not isinstance(root, dict) or not root:
        # 5.6.3 dereferences the missing first member and crashes; we answer 400
        raise BadRequest("invalid json doc: missing root child")
    return root


#: A JSON string without escapes or control characters: its bytes are its text.
_PLAIN = rb'"([^"\\\x00-\x1f]*)"'
#: A JSON integer of at most 9 digits: always a C int.
_SMALL_INT = rb"-?(?:0|[1-9][0-9]{0,8})"
#: SET_CELL exactly as Kamailio (and pydmq) writes it, string or integer value, plain strings.
_SET_CELL = re.compile(
    rb'\{"action":2,"htname":%s,"cname":%s,"type":(?:2,"strval":%s|0,"intval":(%s)),"mode":%s\}'
    % (_PLAIN, _PLAIN, _PLAIN, _SMALL_INT, _SMALL_INT)
)


def decode_set_cell(body: bytes) -> tuple[str, str, Value] | None:
    """``(htname, cname, value)`` of a SET_CELL body in the layout every sender uses, without a
    JSON parse; None for any other body (then :func:`decode` decides, with its errors).

    Where this answers, :func:`decode` gives the same table, cell and value: the strings hold no
    escape, so their bytes decode to the same text (undecodable bytes as surrogates), and
    trailing bytes are ignored as ``raw_decode`` ignores them.
    """
    m = _SET_CELL.match(body)
    if m is None:
        return None
    htname, cname, strval, intval = m.groups()
    value: Value = strval.decode("utf-8", "surrogateescape") if intval is None else int(intval)
    return (
        htname.decode("utf-8", "surrogateescape"),
        cname.decode("utf-8", "surrogateescape"),
        value,
    )


def decode(body: bytes) -> Action | Bulk:
    """Parse and fully validate a KDMQ body of the htable channel (see the module docstring)."""
    if not body:
        raise BadRequest("empty body")
    root = _load(body)
    if next(iter(root)) == "cells":
        return _decode_bulk(root["cells"], b"\\u" in body)
    escapes = b"\\u" in body
    fields: dict[str, Any] | None = None  # only when a number needs converting (rare)
    for key, value in root.items():
        if key in _STR_KEYS:
            if escapes or type(value) is not str:
                _string(key, value)  # the checks (and the errors) of every other path
        elif key not in SINGLE_KEYS:
            raise BadRequest(f"unrecognized field in json object: {key!r}")
        elif type(value) is not int or not INT_MIN <= value <= INT_MAX:
            if fields is None:
                fields = {}
            fields[key] = _number(key, value)  # a float, or an error
    if fields:
        root.update(fields)
    get = root.get
    return Action(
        get("action", ACTION_NONE),
        get("htname"),
        get("cname"),
        get("type", 0),
        get("strval"),
        get("intval"),
        get("mode", 0),
    )


def _decode_bulk(cells: object, escapes: bool) -> Bulk:
    if not isinstance(cells, list):
        raise BadRequest(f"cells must be an array, not {type(cells).__name__}")
    out: list[SyncCell] = []
    skipped = 0
    unknown: set[str] = set()
    for index, item in enumerate(cells):
        if not isinstance(item, dict):
            raise BadRequest(f"cells[{index}] must be an object")
        fields: dict[str, Any] = {}
        for key, value in item.items():
            if key not in _CELL_KEYS:
                unknown.add(key)
                continue
            try:
                if key in _STR_KEYS:
                    fields[key] = _string(key, value, escapes)
                else:
                    fields[key] = _number(key, value)
            except BadRequest as exc:
                raise BadRequest(f"cells[{index}]: {exc}") from None
        htname, cname = fields.get("htname"), fields.get("cname")
        if not htname or not cname:
            skipped += 1  # Kamailio skips a cell without table or cell name
            continue
        if fields.get("type", 0) & AVP_VAL_STR:
            value = fields.get("strval")
            if value is None:
                raise BadRequest(f"cells[{index}]: type 2 (string) without strval")
        else:
            value = fields.get("intval")
            if value is None:
                raise BadRequest(f"cells[{index}]: type 0 (integer) without intval")
        out.append(SyncCell(htname, cname, value, fields.get("expire", 0)))
    return Bulk(tuple(out), skipped, frozenset(unknown))
