"""Load a routing script and adapt its ``request_route`` to ``DmqNode(route=...)``.

A script is a Python file that defines ``request_route(msg)``, a plain function or a coroutine
function; ``msg`` is a :class:`~pydmq.script.msg.Msg`. ``pydmq run --script FILE`` (or
``[script] path``) loads it with :func:`load_route`; in code::

    node = DmqNode(settings, route=load_route("route.py"))
    node = DmqNode(settings, route=ScriptRoute(my_request_route))

Every request that passed ``allowed_sources`` reaches the route exactly once (retransmissions are
absorbed by the server transaction). A synchronous route runs in the receive path: it must not
block. A coroutine route runs in a task (cancelled when the node stops), so requests are no longer
routed strictly one after the other.

An exception in the route is a bug in the script, not in the node: the request is answered
``500 Server Internal Error`` unless it was already answered or dropped, the node keeps running,
and the traceback is logged once per place it was raised from (repeats go to the debug level;
:attr:`ScriptRoute.errors` counts them all). A route that neither answers nor drops leaves the
request unanswered, as a Kamailio script that ends without a reply does.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING

from pydmq.script.msg import Msg

if TYPE_CHECKING:
    from pydmq.dmq.runtime import DmqNode
    from pydmq.sip.endpoint import IncomingRequest

__all__ = ["RequestRoute", "ScriptError", "ScriptRoute", "load_route", "load_script"]

log = logging.getLogger(__name__)

#: What a script defines: ``request_route(msg)``, returning None or an awaitable.
RequestRoute = Callable[[Msg], "Awaitable[object] | object"]

_module_ids = itertools.count(1)


class ScriptError(Exception):
    """The script cannot be used: missing file, an error while importing it, no route."""


def load_script(path: str | os.PathLike[str]) -> ModuleType:
    """Import the file at ``path`` as a fresh module (a new one on every call).

    Raises :class:`ScriptError` when the file does not exist, importing it fails (the message
    names the exception; the original is chained), or it defines no callable ``request_route``.
    """
    filename = os.path.abspath(os.fspath(path))
    if not os.path.isfile(filename):
        raise ScriptError(f"{filename}: no such file")
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name = f"pydmq_script_{next(_module_ids)}_{stem}"
    spec = importlib.util.spec_from_file_location(name, filename)
    if spec is None or spec.loader is None:
        raise ScriptError(f"{filename}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        where = ""
        frames = traceback.extract_tb(exc.__traceback__)
        if isinstance(exc, SyntaxError) and exc.lineno is not None:
            where = f" (line {exc.lineno})"
        elif frames:
            where = f" (line {frames[-1].lineno} of {frames[-1].filename})"
        raise ScriptError(f"{filename}: {type(exc).__name__}: {exc}{where}") from exc
    route = getattr(module, "request_route", None)
    if not callable(route):
        del sys.modules[name]
        raise ScriptError(f"{filename}: defines no request_route(msg) function")
    return module


def load_route(path: str | os.PathLike[str]) -> ScriptRoute:
    """:func:`load_script`, then its ``request_route`` wrapped in a :class:`ScriptRoute`."""
    module = load_script(path)
    return ScriptRoute(module.request_route, module=module)


class ScriptRoute:
    """``DmqNode(route=ScriptRoute(request_route))``: builds the :class:`Msg` and calls the route.

    ``module`` is the loaded script (None for a function given directly); ``errors`` counts the
    exceptions the route raised.
    """

    def __init__(self, func: RequestRoute, *, module: ModuleType | None = None) -> None:
        if not callable(func):
            raise TypeError("request_route must be callable")
        self.func = func
        self.module = module
        self.errors = 0
        self._seen: set[tuple[str, str, int]] = set()

    def __call__(self, dmq: DmqNode, incoming: IncomingRequest) -> None:
        msg = Msg(dmq, incoming)
        try:
            result = self.func(msg)
        except Exception as exc:
            self._failed(msg, exc)
            return
        if inspect.isawaitable(result):
            dmq._spawn(self._finish(msg, result))

    async def _finish(self, msg: Msg, pending: Awaitable[object]) -> None:
        try:
            await pending
        except Exception as exc:
            self._failed(msg, exc)

    def _failed(self, msg: Msg, exc: Exception) -> None:
        self.errors += 1
        frames = traceback.extract_tb(exc.__traceback__)
        filename, lineno = (frames[-1].filename, frames[-1].lineno or 0) if frames else ("", 0)
        site = (type(exc).__name__, filename, lineno)
        if site in self._seen:
            log.debug("request_route failed again for %r: %s: %s", msg, type(exc).__name__, exc)
        else:
            self._seen.add(site)
            log.error(
                "request_route failed for %r (answered 500; further failures from this place"
                " are logged at debug level)",
                msg,
                exc_info=exc,
            )
        if msg.handled:
            return
        try:
            msg.reply(500, "Server Internal Error")
        except Exception:
            log.exception("could not send the 500 for %r", msg)
