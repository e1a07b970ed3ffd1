"""dmq_usrloc's JSON, as Kamailio 5.6.3 writes and reads it (dmq-protocol.md §7.2).

Pure functions: bytes in, :class:`UsrlocMessage` out (or :class:`UsrlocDecodeError` carrying the
reply Kamailio gives), and contacts in, bodies out.

What goes on the wire (captured from Kamailio 5.6.3, byte for byte what :func:`encode_contact`
writes):

* a single change is one object whose keys come in this order: ``action``, ``aor``, ``ruid``,
  ``c``, ``received``, [``sock``, only with ``replicate_socket_info``], ``path``, ``callid``,
  ``user_agent``, ``instance``, ``expires`` (absolute epoch seconds, 0 = permanent), ``cseq``,
  ``flags``, ``cflags``, ``q`` (0..1000, ``-1`` when unspecified), ``last_modified`` (epoch),
  ``methods`` (bit mask, ``4294967295`` = all), ``reg_id``, ``server_id``. No spaces, plain
  integers, strings possibly empty. An RM carries the whole contact as it was, like an UPDATE;
* a sync request is ``{"action":3}``;
* a batch (sync answers with ``batch_msg_contacts`` > 1) is ``{"multi":{"1":{…},"2":{…}}}``;
  the receiver takes it as a batch only when ``multi`` is the first key.

Reading is stricter than Kamailio where Kamailio would crash or store garbage (an empty object, a
string where a number belongs, an UPDATE without AoR or contact): those are ``400 Bad Request``.
Unknown keys are ignored (5.6.3 logs them and goes on), duplicate keys keep the last value (as
Kamailio's key walk does), and a batch is decoded completely before anything is applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "MAX_BODY_SIZE",
    "MULTI_OVERHEAD",
    "Q_UNSPECIFIED",
    "Action",
    "Contact",
    "UsrlocDecodeError",
    "UsrlocMessage",
    "batch_bodies",
    "decode_message",
    "encode_contact",
    "encode_contact_object",
    "encode_multi",
    "encode_sync_request",
]

#: Kamailio's ``Q_UNSPECIFIED``: a contact registered without ``q``.
Q_UNSPECIFIED = -1
#: Largest body accepted: a SIP message is at most 64 KiB (Kamailio's BUF_SIZE), so anything
#: bigger never reaches a Kamailio callback at all.
MAX_BODY_SIZE = 65535
#: ``{"multi":{}}``: what a batch costs before its first contact.
MULTI_OVERHEAD = len('{"multi":{}}')

_U32 = (0, 2**32 - 1)
_I32 = (-(2**31), 2**31 - 1)
_ANY32 = (-(2**31), 2**32 - 1)

#: Numeric keys and the values accepted (Kamailio reads them all as ``unsigned int``; ``q`` is
#: sent as -1 when unspecified and ``reg_id`` / ``server_id`` are signed in usrloc).
_INT_KEYS: dict[str, tuple[int, int]] = {
    "expires": _U32,
    "cseq": _U32,
    "flags": _U32,
    "cflags": _U32,
    "q": _I32,
    "last_modified": _U32,
    "methods": _U32,
    "reg_id": _ANY32,
    "server_id": _ANY32,
}
_STR_KEYS = frozenset(
    {"aor", "ruid", "c", "received", "sock", "path", "callid", "user_agent", "instance"}
)
_SOCK_PROTOS = frozenset({"udp", "tcp", "tls", "sctp", "ws", "wss"})


class Action(IntEnum):
    """dmq_usrloc's ``action`` numbers."""

    NONE = 0
    UPDATE = 1
    RM = 2
    SYNC = 3


@dataclass(frozen=True, slots=True)
class Contact:
    """One location contact (Kamailio's ``ucontact_t``), immutable.

    ``uri`` is the Contact URI (wire key ``c``, ``Address`` in ``ul.dump``). ``expires`` and
    ``last_modified`` are absolute epoch seconds; ``expires == 0`` means permanent. ``q`` is
    Kamailio's integer scale (0..1000) or :data:`Q_UNSPECIFIED`. ``sock`` is the
    ``proto:host:port`` socket string, only carried with ``replicate_socket_info``.
    """

    aor: str
    ruid: str
    uri: str
    received: str = ""
    path: str = ""
    callid: str = ""
    user_agent: str = ""
    instance: str = ""
    expires: int = 0
    cseq: int = 0
    flags: int = 0
    cflags: int = 0
    q: int = Q_UNSPECIFIED
    last_modified: int = 0
    methods: int = 0xFFFFFFFF
    reg_id: int = 0
    server_id: int = 0
    sock: str | None = None

    def is_valid(self, now: float) -> bool:
        """Kamailio's ``VALID_CONTACT``: permanent, or expiring after ``now``."""
        return self.expires == 0 or self.expires > now


@dataclass(frozen=True, slots=True)
class UsrlocMessage:
    """One decoded action. ``contact`` is set for UPDATE and RM, ``None`` otherwise."""

    action: Action
    contact: Contact | None = None


class UsrlocDecodeError(ValueError):
    """A body Kamailio answers with ``code reason`` (400 Bad Request in every case here)."""

    def __init__(self, detail: str, code: int = 400, reason: str = "Bad Request") -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.reason = reason


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------


def _dump(value: object) -> str:
    # srjson/cJSON: no spaces, UTF-8 passed through, the same escapes as Python's json.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_contact_object(action: Action, contact: Contact, *, with_sock: bool = False) -> str:
    """The JSON object of one contact change, keys in Kamailio 5.6.3's order."""
    obj: dict[str, object] = {
        "action": int(action),
        "aor": contact.aor,
        "ruid": contact.ruid,
        "c": contact.uri,
        "received": contact.received,
    }
    if with_sock and contact.sock:
        obj["sock"] = contact.sock
    obj.update(
        path=contact.path,
        callid=contact.callid,
        user_agent=contact.user_agent,
        instance=contact.instance,
        expires=contact.expires,
        cseq=contact.cseq,
        flags=contact.flags,
        cflags=contact.cflags,
        q=contact.q,
        last_modified=contact.last_modified,
        methods=contact.methods,
        reg_id=contact.reg_id,
        server_id=contact.server_id,
    )
    return _dump(obj)


def encode_contact(action: Action, contact: Contact, *, with_sock: bool = False) -> bytes:
    """A single-change body (UPDATE or RM)."""
    return encode_contact_object(action, contact, with_sock=with_sock).encode()


def encode_sync_request() -> bytes:
    """``{"action":3}``: what the init callback broadcasts."""
    return _dump({"action": int(Action.SYNC)}).encode()


def encode_multi(objects: Iterable[str]) -> bytes:
    """``{"multi":{"1":…,"2":…}}`` from already encoded contact objects (keys count from 1)."""
    parts = [f'"{i}":{obj}' for i, obj in enumerate(objects, 1)]
    return ('{"multi":{' + ",".join(parts) + "}}").encode()


def batch_bodies(
    contacts: Iterable[Contact],
    *,
    max_contacts: int = 1,
    max_size: int = 60000,
    action: Action = Action.UPDATE,
    with_sock: bool = False,
) -> Iterator[bytes]:
    """Bodies for a sync answer, produced lazily (one batch in memory at a time).

    ``max_contacts`` <= 1 gives one single-change body per contact, as Kamailio does by
    default. Otherwise contacts are grouped as ``multi`` batches of at most ``max_contacts``
    whose body stays within ``max_size`` bytes (a contact that alone exceeds it travels alone).
    Kamailio estimates the size and flushes once it has *reached* the limit; pydmq measures it,
    so a batch never exceeds the limit it was given.
    """
    if max_contacts <= 1:
        for contact in contacts:
            yield encode_contact(action, contact, with_sock=with_sock)
        return
    group: list[str] = []
    size = MULTI_OVERHEAD
    for contact in contacts:
        obj = encode_contact_object(action, contact, with_sock=with_sock)
        # '"<n>":' + object, plus a comma after the first one; sizes are in UTF-8 bytes.
        cost = len(obj.encode()) + len(str(len(group) + 1)) + 3 + (1 if group else 0)
        if group and size + cost > max_size:
            yield encode_multi(group)
            group, size = [], MULTI_OVERHEAD
            cost = len(obj.encode()) + 4
        group.append(obj)
        size += cost
        if len(group) >= max_contacts:
            yield encode_multi(group)
            group, size = [], MULTI_OVERHEAD
    if group:
        yield encode_multi(group)


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its key/value pairs in document order (duplicates kept)."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsrlocDecodeError(f"body is not UTF-8 ({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except RecursionError:
        raise UsrlocDecodeError("JSON nested too deeply") from None
    except ValueError as exc:
        raise UsrlocDecodeError(f"invalid JSON: {exc}") from None


def _int_value(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsrlocDecodeError(f"{key!r} must be a number, not {_kind(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsrlocDecodeError(f"{key!r} must be finite")
        value = int(value)  # Kamailio casts the double, dropping any fraction
    lo, hi = _INT_KEYS[key]
    if not lo <= value <= hi:
        raise UsrlocDecodeError(f"{key!r} = {value} is out of range {lo}..{hi}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def _check_sock(text: str) -> None:
    """``proto:host:port`` as Kamailio's ``parse_phostport`` wants it (a port is required)."""
    proto, sep, rest = text.partition(":")
    host, sep2, port = rest.rpartition(":")
    if (
        not sep
        or not sep2
        or proto.lower() not in _SOCK_PROTOS
        or not host
        or not port.isdigit()
        or not 0 < int(port) <= 65535
    ):
        raise UsrlocDecodeError(f"bad socket {text[:80]!r}")


def _decode_action(obj: object, *, check_sock: bool) -> UsrlocMessage:
    if not isinstance(obj, _Pairs):
        raise UsrlocDecodeError(f"an action must be a JSON object, not {_kind(obj)}")
    strings: dict[str, str] = {}
    ints: dict[str, int] = {}
    action_value = 0
    for key, value in obj:
        if key == "action":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsrlocDecodeError(f"'action' must be a number, not {_kind(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsrlocDecodeError("'action' must be finite")
            action_value = int(value)
        elif key in _STR_KEYS:
            if not isinstance(value, str):
                raise UsrlocDecodeError(f"{key!r} must be a string, not {_kind(value)}")
            strings[key] = value
        elif key in _INT_KEYS:
            ints[key] = _int_value(key, value)
        # Unknown keys (5.7+ sockname, 5.8+ xavps, master's extras): 5.6.3 logs and goes on.
    try:
        action = Action(action_value)
    except ValueError:
        raise UsrlocDecodeError(f"unknown action {action_value}") from None
    if action in (Action.NONE, Action.SYNC):
        return UsrlocMessage(action)
    sock = strings.get("sock")
    if sock is not None and check_sock:
        _check_sock(sock)
    aor = strings.get("aor", "")
    uri = strings.get("c", "")
    if action is Action.UPDATE and (not aor or not uri):
        raise UsrlocDecodeError("an UPDATE needs a non-empty 'aor' and 'c'")
    contact = Contact(
        aor=aor,
        ruid=strings.get("ruid", ""),
        uri=uri,
        received=strings.get("received", ""),
        path=strings.get("path", ""),
        callid=strings.get("callid", ""),
        user_agent=strings.get("user_agent", ""),
        instance=strings.get("instance", ""),
        expires=ints.get("expires", 0),
        cseq=ints.get("cseq", 0),
        flags=ints.get("flags", 0),
        cflags=ints.get("cflags", 0),
        q=ints.get("q", 0),
        last_modified=ints.get("last_modified", 0),
        methods=ints.get("methods", 0),
        reg_id=ints.get("reg_id", 0),
        server_id=ints.get("server_id", 0),
        sock=sock or None,
    )
    return UsrlocMessage(action, contact)


def decode_message(body: bytes, *, check_sock: bool = False) -> list[UsrlocMessage]:
    """Every action in ``body``, in order; raises :class:`UsrlocDecodeError` if any is bad.

    The whole body is checked before anything is returned, so a caller that applies the result
    never applies half a batch. ``check_sock`` (``replicate_socket_info`` on) makes an
    unparsable ``sock`` a 400, as in Kamailio.

    Missing keys take Kamailio's defaults: empty strings and 0 (so a missing ``q`` is 0, not
    unspecified, and a missing ``action`` is NONE).
    """
    if not body:
        raise UsrlocDecodeError("empty body")
    if len(body) > MAX_BODY_SIZE:
        raise UsrlocDecodeError(f"body of {len(body)} bytes is over {MAX_BODY_SIZE}")
    root = _parse(body)
    if not isinstance(root, _Pairs):
        raise UsrlocDecodeError(f"the body must be a JSON object, not {_kind(root)}")
    if not root:
        # Kamailio 5.6.3 dereferences the missing first key and crashes: never do that.
        raise UsrlocDecodeError("empty JSON object")
    first_key, first_value = root[0]
    if first_key != "multi":
        return [_decode_action(root, check_sock=check_sock)]
    if not isinstance(first_value, _Pairs):
        raise UsrlocDecodeError(f"'multi' must be an object, not {_kind(first_value)}")
    return [_decode_action(item, check_sock=check_sock) for _key, item in first_value]
