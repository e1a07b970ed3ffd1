"""``ul.dump`` and ``ul.lookup`` over a :class:`~pydmq.consumers.usrloc.UsrlocService`, shaped
like Kamailio 5.6.3's usrloc RPC answers (checked against a running 5.6.3).

:func:`rpc_methods` returns plain functions ``handler(params: list) -> result``; the RPC server
puts them in its method table. A handler that fails raises
:class:`~pydmq.dmq.nodelist.RpcFault` (the RPC dispatcher's fault type) with Kamailio's code and
message, which the server turns into the JSON-RPC ``error`` member
(``{"code": 500, "message": "AOR not found in location table"}``).

Shapes (key order as Kamailio prints them)::

    ul.dump [brief]  -> {"Domains": [{"Domain": {"Domain": "location", "Size": 1024,
                          "AoRs": [{"Info": {"AoR": .., "HashID": .., "Contacts":
                          [{"Contact": {...}}]}}],          # brief: [{"AoR": ..}]
                          "Stats": {"Records": n, "Max-Slots": m}}}]}
    ul.lookup table aor -> {"AoR": .., "Contacts": [{"Contact": {...}}]}   (valid contacts)

A contact is ``Address, Expires (seconds left | "permanent" | "expired"), Q (-1 unspecified),
Call-ID, CSeq, User-Agent, Received, Path, State, Flags, CFlags, Socket, Methods, Ruid,
Instance, Reg-Id, Server-Id, Tcpconn-Id, Keepalive, Last-Keepalive, KA-Roundtrip,
Last-Modified``, empty strings shown as ``[not set]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydmq.consumers.usrloc_codec import Q_UNSPECIFIED, Contact
from pydmq.dmq.nodelist import RpcFault

if TYPE_CHECKING:
    from pydmq.consumers.usrloc import UsrlocService

__all__ = ["RpcFault", "contact_struct", "rpc_methods", "ul_dump", "ul_lookup"]

NOT_SET = "[not set]"
_LOOKUP_PARAMS = "Not enough parameters (table and AOR to lookup)"

RpcHandler = Callable[[list[object]], object]


def _q(q: int) -> int | float:
    """``q2double``: -1 stays -1, otherwise q/1000, printed as an integer when whole."""
    if q == Q_UNSPECIFIED:
        return -1
    value = q / 1000
    return int(value) if value.is_integer() else value


def _expires(contact: Contact, now: int) -> int | str:
    if contact.expires == 0:
        return "permanent"
    if now > contact.expires:
        return "expired"
    return contact.expires - now


def contact_struct(contact: Contact, now: int) -> dict[str, object]:
    """One ``Contact`` struct as usrloc's ``rpc_dump_contact`` builds it."""
    return {
        "Address": contact.uri,
        "Expires": _expires(contact, now),
        "Q": _q(contact.q),
        "Call-ID": contact.callid,
        "CSeq": contact.cseq,
        "User-Agent": contact.user_agent or NOT_SET,
        "Received": contact.received or NOT_SET,
        "Path": contact.path or NOT_SET,
        "State": "CS_NEW",  # db_mode 0: nothing is ever written to a database
        "Flags": contact.flags,
        "CFlags": contact.cflags,
        "Socket": contact.sock or NOT_SET,
        "Methods": contact.methods,
        "Ruid": contact.ruid or NOT_SET,
        "Instance": contact.instance or NOT_SET,
        "Reg-Id": contact.reg_id,
        "Server-Id": contact.server_id,
        "Tcpconn-Id": -1,
        "Keepalive": 0,
        "Last-Keepalive": contact.last_modified,
        "KA-Roundtrip": 0,
        "Last-Modified": contact.last_modified,
    }


def ul_dump(service: UsrlocService, params: list[object]) -> dict[str, object]:
    """``ul.dump [brief]``: every record of the table, expired contacts included."""
    brief = bool(params) and params[0] == "brief"
    now = int(service.clock())
    records = service.dump()
    if brief:
        aors: list[object] = [{"AoR": r.aor} for r in records]
    else:
        aors = [
            {
                "Info": {
                    "AoR": r.aor,
                    "HashID": r.aorhash,
                    "Contacts": [{"Contact": contact_struct(c, now)} for c in r.contacts],
                }
            }
            for r in records
        ]
    count, max_slot = service.store.slot_stats()
    domain = {
        "Domain": service.domain,
        "Size": service.store.hash_size,
        "AoRs": aors,
        "Stats": {"Records": count, "Max-Slots": max_slot},
    }
    return {"Domains": [{"Domain": domain}]}


def ul_lookup(service: UsrlocService, params: list[object]) -> dict[str, object]:
    """``ul.lookup <table> <aor>``: the valid contacts of one AoR."""
    if len(params) < 2 or not isinstance(params[0], str) or not isinstance(params[1], str):
        raise RpcFault(500, _LOOKUP_PARAMS)
    table, aor = params[0], params[1]
    if table != service.domain:
        raise RpcFault(500, "Domain table not found")
    if service.settings.use_domain and "@" not in aor:
        raise RpcFault(500, "Domain missing in AOR")
    aor = service.normalize_aor(aor)
    if aor not in service.store:
        raise RpcFault(500, "AOR not found in location table")
    now = int(service.clock())
    valid = service.store.lookup(aor, now)
    if not valid:
        raise RpcFault(500, "AOR has no contacts")
    return {"AoR": aor, "Contacts": [{"Contact": contact_struct(c, now)} for c in valid]}


def rpc_methods(service: UsrlocService) -> dict[str, RpcHandler]:
    """``{"ul.dump": handler, "ul.lookup": handler}`` bound to ``service``."""

    def dump(params: list[object]) -> object:
        return ul_dump(service, params)

    def lookup(params: list[object]) -> object:
        return ul_lookup(service, params)

    return {"ul.dump": dump, "ul.lookup": lookup}
