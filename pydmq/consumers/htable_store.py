"""htable's tables and cells: Kamailio's ``ht_api.c`` semantics, without I/O.

A :class:`HtableStore` holds named tables of string or integer cells. Nothing here sends,
sleeps or logs on a timer: time comes from an injectable ``clock`` (wall-clock epoch seconds,
as Kamailio's ``time(NULL)``; expiry times travel between nodes as absolute epochs), and the
caller decides when to sweep expired cells (:meth:`HtableStore.expire`). Replication is the
caller's business too (:mod:`pydmq.consumers.htable`).

Semantics copied from Kamailio 5.6.3 (``ht_api.c``):

* a cell's ``expire`` is an absolute epoch second, ``0`` = never. Only tables with
  ``autoexpire > 0`` ever expire cells; there a cell is expired once ``expire != 0`` and
  ``expire < now``. Expired cells are invisible to :meth:`~HtableStore.get` and sync, and are
  removed by the sweep (every ``timer_interval`` seconds, like Kamailio's timer);
* setting a value (``ht_set_cell_ex``): a new cell expires ``autoexpire`` seconds from now; an
  updated one too when ``updateexpire`` is on (the default), else it keeps its expiry; an explicit
  ``expire > 0`` gives ``now + expire`` instead;
* :meth:`~HtableStore.set_expire` (``ht_set_cell_expire``) is ignored on tables without
  ``autoexpire``; ``seconds <= 0`` means "never";
* increments (``ht_cell_value_add``) only work on integer cells; a missing cell starts from the
  table's ``initval`` and without one nothing happens (Kamailio returns ``$null``);
* removal by regular expression is POSIX extended, case-insensitive, unanchored, with
  ``REG_NEWLINE`` (``regcomp(REG_EXTENDED|REG_ICASE|REG_NEWLINE)``); by value only string cells
  can match. Prefix removal compares bytes exactly.

Integers are C ``int`` on the wire and in dumps, so values are kept in the signed 32-bit range
(increments wrap around like the ``(int)`` casts do).

Iteration in Kamailio order (:meth:`HtableStore.ordered`): by slot (``core_case_hash(name) &
(slots - 1)``), then hash id, then insertion. This is the order of ``htable.dump`` and of the
sync groups Kamailio sends.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pydmq.config import HtableSpec

__all__ = [
    "AVP_VAL_STR",
    "INT_MAX",
    "INT_MIN",
    "Cell",
    "HtableError",
    "HtablePatternError",
    "HtableStore",
    "Table",
    "UnknownTableError",
    "Value",
    "check_int",
    "check_str",
    "compile_posix_re",
    "core_case_hash",
    "wrap_int",
]

#: Kamailio's ``AVP_VAL_STR`` flag: the ``type`` of a string cell on the wire, its ``flags``.
AVP_VAL_STR = 2
INT_MIN = -(2**31)
INT_MAX = 2**31 - 1

Value = int | str


class HtableError(Exception):
    """An htable operation cannot be done (unknown table, bad value, bad pattern)."""


class UnknownTableError(HtableError, LookupError):
    """No table of that name is configured (Kamailio: ``No such htable``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no such htable: {name!r}")
        self.name = name


class HtablePatternError(HtableError, ValueError):
    """A removal pattern is empty or not a valid regular expression (Kamailio: -1, 500)."""


def check_str(value: str) -> bytes:
    """``value`` as the bytes that go on the wire and into the hash; ValueError if impossible.

    Strings read from the wire keep undecodable bytes as lone surrogates (``surrogateescape``),
    so whatever a Kamailio peer sent comes back out byte for byte.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{value!r} cannot be encoded as UTF-8") from None


def check_int(value: int) -> int:
    """``value`` if it is a C int (Kamailio's range for cell values); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"{value} is outside the 32-bit range of htable integers")
    return value


def wrap_int(value: int) -> int:
    """Two's-complement wrap into the signed 32-bit range (what Kamailio's ``(int)`` does)."""
    return (value - INT_MIN) % 2**32 + INT_MIN


# ---- Kamailio's core_case_hash (core/hashes.h) ------------------------------------------------

_LOWER = bytes(c | 0x20 if 65 <= c <= 90 else c for c in range(256))
_M32 = 0xFFFFFFFF


def _icase(byte: int) -> int:
    c = byte - 256 if byte >= 128 else byte  # a signed char on x86
    return c | 0x20 if 65 <= c <= 90 else c


def core_case_hash(data: bytes) -> int:
    """Kamailio's ``core_case_hash(s, 0, 0)``: the cell id; ``& (slots - 1)`` is its slot."""
    n4 = len(data) & ~3
    h = 0
    if data.isascii():
        low = data.translate(_LOWER)
        for v in struct.unpack(f">{n4 // 4}I", low[:n4]):
            h += v ^ (v >> 3)
        v = 0
        for b in low[n4:]:
            v = (v << 8) + b
    else:
        for i in range(0, n4, 4):
            v = (
                (_icase(data[i]) << 24)
                + (_icase(data[i + 1]) << 16)
                + (_icase(data[i + 2]) << 8)
                + _icase(data[i + 3])
            ) & _M32
            h += v ^ (v >> 3)
        v = 0
        for b in data[n4:]:
            v = ((v << 8) + _icase(b)) & _M32
    h = (h + (v ^ (v >> 3))) & _M32
    return ((h + (h >> 11)) + ((h >> 13) + (h >> 23))) & _M32


# ---- POSIX ERE -> Python re ----------------------------------------------------------------

_POSIX_CLASSES = {
    "[:alpha:]": "a-zA-Z",
    "[:digit:]": "0-9",
    "[:alnum:]": "a-zA-Z0-9",
    "[:upper:]": "A-Z",
    "[:lower:]": "a-z",
    "[:space:]": " \\t\\n\\r\\f\\v",
    "[:blank:]": " \\t",
    "[:punct:]": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "[:xdigit:]": "0-9A-Fa-f",
    "[:cntrl:]": "\\x00-\\x1f\\x7f",
    "[:print:]": "\\x20-\\x7e",
    "[:graph:]": "\\x21-\\x7e",
}
_POSIX_CLASS_RE = re.compile("|".join(re.escape(k) for k in _POSIX_CLASSES))


def compile_posix_re(pattern: str) -> re.Pattern[str]:
    """Compile a POSIX extended regex the way htable uses it (case-insensitive, newline-aware).

    Python's engine stands in for glibc's: bracket classes such as ``[[:digit:]]`` are
    translated, the common ERE syntax is the same. Raises :class:`HtablePatternError` for an
    empty or invalid pattern.
    """
    if not pattern:
        raise HtablePatternError("empty pattern")
    translated = _POSIX_CLASS_RE.sub(lambda m: _POSIX_CLASSES[m.group(0)], pattern)
    try:
        return re.compile(translated, re.IGNORECASE | re.MULTILINE)
    except re.error as exc:
        raise HtablePatternError(f"bad regular expression {pattern!r}: {exc}") from None


# ---- tables and cells ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Cell:
    """One item. ``expire`` is an absolute epoch second, 0 = never."""

    name: str
    value: Value
    expire: int
    hid: int
    seq: int

    @property
    def is_str(self) -> bool:
        return isinstance(self.value, str)

    @property
    def flags(self) -> int:
        """Kamailio's cell flags: ``AVP_VAL_STR`` (2) for a string, 0 for an integer."""
        return AVP_VAL_STR if isinstance(self.value, str) else 0


class Table:
    """One named table (its definition and cells)."""

    __slots__ = ("cells", "spec")

    def __init__(self, spec: HtableSpec) -> None:
        self.spec = spec
        self.cells: dict[str, Cell] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def autoexpire(self) -> int:
        return self.spec.autoexpire

    @property
    def dmqreplicate(self) -> bool:
        return self.spec.dmqreplicate

    @property
    def slots(self) -> int:
        return self.spec.slots

    def expired(self, cell: Cell, now: int) -> bool:
        """Kamailio's test: only autoexpire tables expire cells, and ``expire == 0`` never."""
        return self.spec.autoexpire > 0 and cell.expire != 0 and cell.expire < now

    def __len__(self) -> int:
        return len(self.cells)


class HtableStore:
    """The configured tables. Every method takes the table name first and raises
    :class:`UnknownTableError` for a name that is not configured."""

    def __init__(
        self, specs: Iterable[HtableSpec], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.tables: dict[str, Table] = {}
        for spec in specs:
            if spec.name in self.tables:
                raise ValueError(f"htable {spec.name!r} is defined twice")
            self.tables[spec.name] = Table(spec)
        self.clock = clock
        self._seq = 0

    def now(self) -> int:
        """Whole epoch seconds, like ``time(NULL)``."""
        return int(self.clock())

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise UnknownTableError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self.tables

    # -- reading ------------------------------------------------------------------------------
    def get(self, table: str, name: str) -> Cell | None:
        """The live cell (None when missing or expired but not yet swept)."""
        t = self.table(table)
        cell = t.cells.get(name)
        if cell is None or t.expired(cell, self.now()):
            return None
        return cell

    def live_cells(self, table: str) -> list[Cell]:
        """Cells that have not expired, in insertion order."""
        t = self.table(table)
        now = self.now()
        return [c for c in t.cells.values() if not t.expired(c, now)]

    def ordered(self, table: str) -> list[Cell]:
        """Every cell (expired ones too, as ``htable.dump``) in Kamailio's slot order."""
        t = self.table(table)
        mask = t.slots - 1
        return sorted(t.cells.values(), key=lambda c: (c.hid & mask, c.hid, c.seq))

    # -- writing ------------------------------------------------------------------------------
    def set(self, table: str, name: str, value: Value, *, expire: int = 0) -> Cell:
        """``ht_set_cell_ex``: store ``value``; ``expire > 0`` = expires that many seconds from
        now (autoexpire tables only), else the table's rules (see the module docstring)."""
        t = self.table(table)
        # ASCII text always encodes (isascii() is a flag test): only other text is checked.
        if type(name) is not str or not name.isascii():
            check_str(name)
        if isinstance(value, str):
            if not value.isascii():
                check_str(value)
        else:
            check_int(value)
        autoexpire = t.autoexpire
        now = self.now() if autoexpire > 0 else 0
        explicit = expire > 0 and autoexpire > 0
        new_expire = now + (expire if explicit else autoexpire)
        cell = t.cells.get(name)
        if cell is None:
            self._seq += 1
            cell = Cell(name, value, new_expire, core_case_hash(check_str(name)), self._seq)
            t.cells[name] = cell
            return cell
        cell.value = value
        if explicit or t.spec.updateexpire:
            cell.expire = new_expire
        return cell

    def set_expire(self, table: str, name: str, seconds: int) -> bool:
        """``ht_set_cell_expire``: True if a cell's expiry changed (autoexpire tables only)."""
        t = self.table(table)
        if t.autoexpire == 0:
            return False
        cell = t.cells.get(name)
        if cell is None:
            return False
        cell.expire = self.now() + seconds if seconds > 0 else 0
        return True

    def add(self, table: str, name: str, delta: int) -> Cell | None:
        """``ht_cell_value_add``: add ``delta`` to an integer cell; the new cell, or None when
        the cell holds a string, or is missing (or expired) in a table without ``initval``."""
        t = self.table(table)
        now = self.now() if t.autoexpire > 0 else 0
        cell = t.cells.get(name)
        if cell is not None and t.expired(cell, now):
            del t.cells[name]  # Kamailio would revive it with its old value
            cell = None
        if cell is None:
            if t.spec.initval is None:
                return None
            return self.set(table, name, wrap_int(t.spec.initval + delta))
        if isinstance(cell.value, str):
            return None
        cell.value = wrap_int(cell.value + delta)
        if t.spec.updateexpire:
            cell.expire = now + t.autoexpire
        return cell

    def delete(self, table: str, name: str) -> bool:
        """``ht_del_cell``: True if the cell existed."""
        return self.table(table).cells.pop(name, None) is not None

    def remove_re(self, table: str, pattern: str, *, by_value: bool = False) -> int:
        """``ht_rm_cell_re``: remove cells whose name (or string value) matches; the count."""
        t = self.table(table)
        rx = compile_posix_re(pattern)
        if by_value:
            doomed = [
                n for n, c in t.cells.items() if isinstance(c.value, str) and rx.search(c.value)
            ]
        else:
            doomed = [n for n in t.cells if rx.search(n)]
        for n in doomed:
            del t.cells[n]
        return len(doomed)

    def remove_prefix(self, table: str, prefix: str, *, by_value: bool = False) -> int:
        """``ht_rm_cell_op(..., HT_RM_OP_SW)``: remove cells whose name (or string value)
        starts with ``prefix``; the count. An empty prefix is refused, as in Kamailio."""
        t = self.table(table)
        if not prefix:
            raise HtablePatternError("empty prefix")
        if by_value:
            doomed = [
                n
                for n, c in t.cells.items()
                if isinstance(c.value, str) and c.value.startswith(prefix)
            ]
        else:
            doomed = [n for n in t.cells if n.startswith(prefix)]
        for n in doomed:
            del t.cells[n]
        return len(doomed)

    def flush(self, table: str) -> int:
        """``ht_reset_content``: remove every cell; the count."""
        t = self.table(table)
        count = len(t.cells)
        t.cells.clear()
        return count

    def expire(self, now: float | None = None) -> int:
        """The timer: drop expired cells of every autoexpire table; the count removed."""
        when = int(self.clock() if now is None else now)
        removed = 0
        for t in self.tables.values():
            if t.autoexpire <= 0:
                continue
            doomed = [n for n, c in t.cells.items() if c.expire != 0 and c.expire < when]
            for n in doomed:
                del t.cells[n]
            removed += len(doomed)
        return removed

    # -- sync --------------------------------------------------------------------------------
    def sync_keys(self, table: str | None = None) -> list[tuple[str, str]]:
        """``(table, name)`` of every cell a sync answer covers, in Kamailio's order: tables with
        ``dmqreplicate`` (only ``table`` if given), slot order inside each."""
        out: list[tuple[str, str]] = []
        for t in self.tables.values():
            if not t.dmqreplicate or (table is not None and t.name != table):
                continue
            out.extend((t.name, c.name) for c in self.ordered(t.name))
        return out

    def sync_cell(self, table: str, name: str) -> Cell | None:
        """The cell to put into a sync answer now, or None (gone, or expired: Kamailio skips a
        cell of an autoexpire table with ``expire <= now``, and so do we)."""
        t = self.tables.get(table)
        if t is None:
            return None
        cell = t.cells.get(name)
        if cell is None:
            return None
        if t.autoexpire > 0 and cell.expire != 0 and cell.expire <= self.now():
            return None
        return cell

    def iter_tables(self) -> Iterator[Table]:
        return iter(self.tables.values())
