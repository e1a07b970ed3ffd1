"""htable's RPC methods, named and answering like Kamailio 5.6.3's (checked against a running
5.6.3 through jsonrpcs).

Every handler is a plain function ``handler(service, params: list) -> result``;
:func:`rpc_methods` binds them to one :class:`~pydmq.consumers.htable.HtableService` for the RPC
server's method table. A handler that fails raises :class:`~pydmq.dmq.nodelist.RpcFault` with
Kamailio's code and message, which the server turns into the JSON-RPC ``error`` member.

========================= =================== ===========================================
method                    params              result
========================= =================== ===========================================
``htable.get``            table, key          ``{"item": {"name", "value", "flags",
                                              "expire": "NEVER" | "YYYY-mm-dd HH:MM:SS"}}``
``htable.sets``           table, key, str     ``"Ok. Key set to new value."``
``htable.seti``           table, key, int     ``"Ok. Key set to new value."``
``htable.setxs``          table, key, str, s  ``"Ok. Key set to new value."``
``htable.setxi``          table, key, int, s  ``"Ok. Key set to new value."``
``htable.setex``          table, key, s       ``"Ok"``
``htable.delete``         table, key          ``"Ok. Key deleted."`` (404 if missing)
``htable.dump``           table               ``[{"entry", "size", "slot": [{"name",
                                              "value", "type": "str"|"int"}]}]``
``htable.listTables``     --                  ``[{"name", "dbtable", "dbmode", "expire",
                                              "updateexpire", "size", "dmqreplicate"}]``
``htable.stats``          --                  ``[{"name", "slots", "all", "min", "max"}]``
``htable.flush``          table               ``"Ok. Htable flushed."``
``htable.reload``         table               fault ``500 No htable db_url`` (no database)
``htable.store``          table               fault ``500 No htable db_url`` (no database)
``htable.dmqsync``        [table]             ``"Ok. Sync requested."`` (Kamailio 5.8+)
========================= =================== ===========================================

Parameters are read like ``rpc->scan``: a string parameter may be given as a number (its text
is used: ``htable.sets t k 7`` stores ``"7"``); an integer parameter may be a float (truncated)
or a numeric string. A missing or unusable parameter gives Kamailio's ``Not enough
parameters (...)`` fault. Differences from 5.6.3: an integer outside the 32-bit range or a
non-numeric string for an integer is refused (``500 Invalid parameter value``) where Kamailio
stores garbage (``INT_MIN`` or 0); ``htable.flush`` replicates (see :mod:`pydmq.consumers.htable`);
``htable.dmqsync`` exists (5.8 added it).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydmq.consumers.htable_store import INT_MAX, INT_MIN, Cell, HtableStore, UnknownTableError
from pydmq.dmq.nodelist import RpcFault

if TYPE_CHECKING:
    from pydmq.consumers.htable import HtableService

__all__ = [
    "RpcFault",
    "RpcHandler",
    "dump_table",
    "htable_delete",
    "htable_dmqsync",
    "htable_dump",
    "htable_flush",
    "htable_get",
    "htable_list_tables",
    "htable_reload",
    "htable_setex",
    "htable_seti",
    "htable_sets",
    "htable_setxi",
    "htable_setxs",
    "htable_stats",
    "htable_store",
    "htable_syncstatus",
    "rpc_methods",
]

RpcHandler = Callable[[list[object]], object]

SET_OK = "Ok. Key set to new value."
NO_SUCH_HTABLE = "No such htable"
NO_DB_URL = "No htable db_url"
INVALID_VALUE = "Invalid parameter value"
_GET_PARAMS = "Not enough parameters (htable name and key name)"
_DELETE_PARAMS = "Not enough parameters (htable name & key name"  # sic: Kamailio's text
_SET_PARAMS = "Not enough parameters (htable name, key name and value)"
_SETEX_PARAMS = "Not enough parameters (htable name, item name and expire)"
_SETX_PARAMS = "Not enough parameters (htable name, key name, value and expire)"
_NO_NAME = "No htable name given"
_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _str(params: list[object], index: int, fault: str) -> str:
    """``rpc->scan("S")``: a string, or a number's text; anything else (or nothing) faults."""
    if index >= len(params):
        raise RpcFault(500, fault)
    value = params[index]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RpcFault(500, fault)


def _int(params: list[object], index: int, fault: str) -> int:
    """``rpc->scan("d")``: an integer (a float is truncated, numeric text is read)."""
    if index >= len(params):
        raise RpcFault(500, fault)
    value = params[index]
    if isinstance(value, bool) or value is None:
        raise RpcFault(500, fault)
    if isinstance(value, float):
        value = int(value)
    elif isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            raise RpcFault(500, INVALID_VALUE)
        value = int(value)
    if not isinstance(value, int):
        raise RpcFault(500, fault)
    if not INT_MIN <= value <= INT_MAX:
        raise RpcFault(500, INVALID_VALUE)
    return value


def _table_name(service: HtableService, name: str, fault: str = NO_SUCH_HTABLE) -> str:
    if name not in service.store:
        raise RpcFault(500, fault)
    return name


def _expire_text(cell: Cell) -> str:
    if not cell.expire:
        return "NEVER"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cell.expire))


def htable_get(service: HtableService, params: list[object]) -> object:
    """Get one key from a hash table."""
    table = _str(params, 0, _GET_PARAMS)
    key = _str(params, 1, _GET_PARAMS)
    cell = service.get_cell(_table_name(service, table), key)
    if cell is None:
        raise RpcFault(500, "Key name doesn't exist in htable.")
    return {
        "item": {
            "name": cell.name,
            "value": cell.value,
            "flags": cell.flags,
            "expire": _expire_text(cell),
        }
    }


def htable_sets(service: HtableService, params: list[object]) -> object:
    """Set one key in a hash table to a string value."""
    table, key = _str(params, 0, _SET_PARAMS), _str(params, 1, _SET_PARAMS)
    value = _str(params, 2, _SET_PARAMS)
    service.set(_table_name(service, table), key, value)
    return SET_OK


def htable_seti(service: HtableService, params: list[object]) -> object:
    """Set one key in a hash table to an integer value."""
    table, key = _str(params, 0, _SET_PARAMS), _str(params, 1, _SET_PARAMS)
    value = _int(params, 2, _SET_PARAMS)
    service.set(_table_name(service, table), key, value)
    return SET_OK


def htable_setxs(service: HtableService, params: list[object]) -> object:
    """Set one key in a hash table to a string value and its expire."""
    table, key = _str(params, 0, _SETX_PARAMS), _str(params, 1, _SETX_PARAMS)
    value = _str(params, 2, _SETX_PARAMS)
    expire = _int(params, 3, _SETX_PARAMS)
    service.set(_table_name(service, table, "Failed to set the item"), key, value, expire)
    return SET_OK


def htable_setxi(service: HtableService, params: list[object]) -> object:
    """Set one key in a hash table to an integer value and its expire."""
    table, key = _str(params, 0, _SETX_PARAMS), _str(params, 1, _SETX_PARAMS)
    value = _int(params, 2, _SETX_PARAMS)
    expire = _int(params, 3, _SETX_PARAMS)
    service.set(_table_name(service, table, "Failed to set the item"), key, value, expire)
    return SET_OK


def htable_setex(service: HtableService, params: list[object]) -> object:
    """Set the expire of one key in a hash table."""
    table, key = _str(params, 0, _SETEX_PARAMS), _str(params, 1, _SETEX_PARAMS)
    expire = _int(params, 2, _SETEX_PARAMS)
    service.set_expire(_table_name(service, table), key, expire)
    return "Ok"


def htable_delete(service: HtableService, params: list[object]) -> object:
    """Delete one key from a hash table."""
    table, key = _str(params, 0, _DELETE_PARAMS), _str(params, 1, _DELETE_PARAMS)
    if not service.delete(_table_name(service, table), key):
        raise RpcFault(404, "Key not found in htable.")
    return "Ok. Key deleted."


def dump_table(store: HtableStore, table: str) -> list[dict[str, object]]:
    """``htable.dump``'s result for ``table``: non-empty slots in order, cells in slot order
    (expired cells not yet swept included, as in Kamailio)."""
    mask = store.table(table).slots - 1
    out: list[dict[str, object]] = []
    current: list[dict[str, object]] = []
    entry = -1
    for cell in store.ordered(table):
        slot = cell.hid & mask
        if slot != entry:
            current = []
            entry = slot
            out.append({"entry": slot, "size": 0, "slot": current})
        current.append(
            {"name": cell.name, "value": cell.value, "type": "str" if cell.is_str else "int"}
        )
        out[-1]["size"] = len(current)
    return out


def htable_dump(service: HtableService, params: list[object]) -> object:
    """Dump the contents of hash table."""
    table = _str(params, 0, _NO_NAME)
    return dump_table(service.store, _table_name(service, table))


def htable_list_tables(service: HtableService, params: list[object]) -> object:
    """List all htables."""
    # Kamailio keeps its tables in a list built by head insertion: last defined first.
    return [
        {
            "name": t.name,
            "dbtable": "",
            "dbmode": 0,
            "expire": t.autoexpire,
            "updateexpire": int(t.spec.updateexpire),
            "size": t.slots,
            "dmqreplicate": int(t.dmqreplicate),
        }
        for t in reversed(list(service.store.iter_tables()))
    ]


def htable_stats(service: HtableService, params: list[object]) -> object:
    """Statistics about htables."""
    out: list[dict[str, object]] = []
    for t in reversed(list(service.store.iter_tables())):
        mask = t.slots - 1
        per_slot = Counter(c.hid & mask for c in t.cells.values())
        biggest = max(per_slot.values(), default=0)
        smallest = min(per_slot.values()) if len(per_slot) == t.slots else 0
        out.append(
            {"name": t.name, "slots": t.slots, "all": len(t), "min": smallest, "max": biggest}
        )
    return out


def htable_flush(service: HtableService, params: list[object]) -> object:
    """Flush hash table."""
    table = _str(params, 0, _NO_NAME)
    service.flush(_table_name(service, table))
    return "Ok. Htable flushed."


def htable_reload(service: HtableService, params: list[object]) -> object:
    """Reload hash table (no database here: Kamailio's answer without ``db_url``)."""
    raise RpcFault(500, NO_DB_URL)


def htable_store(service: HtableService, params: list[object]) -> object:
    """Store hash table to database (no database here: Kamailio's answer without ``db_url``)."""
    raise RpcFault(500, NO_DB_URL)


def htable_dmqsync(service: HtableService, params: list[object]) -> object:
    """Perform a DMQ sync action: ask the other nodes for their tables (all, or the one named)."""
    table = _str(params, 0, _NO_NAME) if params and params[0] not in (None, "") else None
    if service.api is None:
        raise RpcFault(500, "DMQ replication is not enabled")
    try:
        future = service.request_sync(table)
    except UnknownTableError:
        raise RpcFault(500, NO_SUCH_HTABLE) from None
    if future is None:
        raise RpcFault(500, "Sync request failed")
    return "Ok. Sync requested."


def htable_syncstatus(service: HtableService, params: list[object]) -> object:
    """pydmq: progress of the sync this node asked for last (``htable.dmqsync``): nodes asked,
    nodes whose answer ended (an empty final group), groups and cells received so far."""
    return dict(service.sync_in)


_METHODS: dict[str, Callable[[HtableService, list[object]], object]] = {
    "htable.get": htable_get,
    "htable.sets": htable_sets,
    "htable.seti": htable_seti,
    "htable.setxs": htable_setxs,
    "htable.setxi": htable_setxi,
    "htable.setex": htable_setex,
    "htable.delete": htable_delete,
    "htable.dump": htable_dump,
    "htable.listTables": htable_list_tables,
    "htable.stats": htable_stats,
    "htable.flush": htable_flush,
    "htable.reload": htable_reload,
    "htable.store": htable_store,
    "htable.dmqsync": htable_dmqsync,
    "htable.syncstatus": htable_syncstatus,
}


def rpc_methods(service: HtableService) -> dict[str, RpcHandler]:
    """Every ``htable.*`` method bound to ``service``, for the RPC server's method table."""

    def bind(handler: Callable[[HtableService, list[object]], object]) -> RpcHandler:
        def call(params: list[object]) -> object:
            return handler(service, params)

        call.__name__ = handler.__name__
        call.__doc__ = handler.__doc__
        return call

    return {name: bind(handler) for name, handler in _METHODS.items()}
