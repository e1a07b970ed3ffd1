"""Routing scripts: Kamailio's ``request_route`` as a Python function (see ``docs/scripting.md``).

A script defines ``request_route(msg)`` (sync or async); ``msg`` is a :class:`Msg` with the
request, ``reply``/``drop`` and the dmq module's functions (``msg.dmq_handle_message()``,
``msg.dmq_t_replicate()``, ...), which are also importable from here as functions taking ``msg``.
"""

from pydmq.script.functions import (
    SendError,
    bcast_message,
    default_request_route,
    dmq_bcast_message,
    dmq_handle_message,
    dmq_is_from_node,
    dmq_process_message,
    dmq_send_message,
    dmq_t_replicate,
    send_message,
)
from pydmq.script.loader import RequestRoute, ScriptError, ScriptRoute, load_route, load_script
from pydmq.script.msg import Headers, Msg

__all__ = [
    "Headers",
    "Msg",
    "RequestRoute",
    "ScriptError",
    "ScriptRoute",
    "SendError",
    "bcast_message",
    "default_request_route",
    "dmq_bcast_message",
    "dmq_handle_message",
    "dmq_is_from_node",
    "dmq_process_message",
    "dmq_send_message",
    "dmq_t_replicate",
    "load_route",
    "load_script",
    "send_message",
]
