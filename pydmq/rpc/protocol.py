"""JSON-RPC 2.0 envelopes shaped like Kamailio's ``jsonrpcs`` module (transport-independent).

:class:`Dispatcher` turns one request body into one reply body; the HTTP and unix-socket servers
only move bytes. What a reply looks like, checked against a running Kamailio 5.6.3:

* members in the order ``jsonrpc``, ``result`` | ``error``, ``id``; the text laid out exactly as
  jsonrpcs' default ``pretty_format`` prints it (:func:`format_json`), so the golden files in
  ``wire-kamailio-5.6.3/jsonrpc_*.json`` compare byte for byte;
* a fault is ``{"code": <int>, "message": <text>}``; method faults use Kamailio's codes and texts
  (``500 Invalid Parameters``...), an unknown method is ``500 Method Not Found`` (not -32601);
* a request without ``id`` still gets a reply, without ``id`` (jsonrpcs does the same).

Where Kamailio has no sensible answer we use JSON-RPC 2.0's: a body that is not JSON gets
``-32700 Parse Error`` (Kamailio never replies), a request that is not a JSON-RPC 2.0 object
(no or wrong ``jsonrpc``/``method``, ``params`` not an array or object, an ``id`` that is not a
string, number or null, a batch) gets ``-32600 Invalid Request`` (Kamailio answers
``"result": {}`` or crashes), and a handler bug gets ``-32603 Internal Error``; these replies
carry ``"id": null`` unless the request's id was readable.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pydmq.dmq.nodelist import RpcFault

log = logging.getLogger(__name__)

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_REQUEST",
    "PARSE_ERROR",
    "Dispatcher",
    "Handler",
    "Method",
    "MethodTable",
    "Params",
    "Reply",
    "RpcFault",
    "error_body",
    "format_json",
    "http_status_of",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603

#: Positional parameters after named ones were mapped onto the method's parameter names.
Params = list[object]
#: A method: gets the positional parameters, returns the result (or an awaitable of it), or
#: raises :class:`RpcFault`.
Handler = Callable[[Params], object]

_NO_ID = object()


# ---------------------------------------------------------------------------------------------
# Kamailio's JSON layout (srjson_Print, "pretty_format" 1: the jsonrpcs default)


def format_json(value: object) -> str:
    """``value`` as jsonrpcs prints it: objects one member a line, indented with tabs,
    ``"key":<TAB>value``; arrays on one line, ``[a, b]``; no trailing newline.

    Strings, ints, booleans and null are written as JSON; floats as Python's shortest repr (srjson
    would write ``1.500000``). Raises ``TypeError`` for anything that is not plain JSON data and
    ``ValueError`` for NaN or infinity.
    """
    out: list[str] = []
    _write(value, 0, out)
    return "".join(out)


def _string(text: str) -> str:
    # srjson escapes ", \, \b \f \n \r \t and other control characters as \u00xx and writes
    # everything else as UTF-8, as json.dumps(ensure_ascii=False) does. A lone surrogate (from a
    # "\ud800" in a request) cannot be UTF-8: escape the whole string then.
    dumped = json.dumps(text, ensure_ascii=False)
    if not dumped.isascii():
        try:
            dumped.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(text)
    return dumped


def _write(value: object, depth: int, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None or isinstance(value, bool | int | float):
        out.append(json.dumps(value, allow_nan=False))
    elif isinstance(value, Mapping):
        out.append("{\n")
        items = list(value.items())
        for i, (key, member) in enumerate(items):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            out.append("\t" * (depth + 1))
            out.append(_string(key))
            out.append(":\t")
            _write(member, depth + 1, out)
            out.append(",\n" if i < len(items) - 1 else "\n")
        out.append("\t" * depth)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _write(item, depth + 1, out)
        out.append("]")
    else:
        raise TypeError(f"not JSON data: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC method: ``handler(params)``; ``params`` names the positional parameters, in
    order, so that a named-parameter object (``{"uri": ...}``) can be mapped onto them."""

    name: str
    handler: Handler
    doc: str
    params: tuple[str, ...] = ()


@dataclass(slots=True)
class MethodTable:
    """name -> :class:`Method`."""

    methods: dict[str, Method] = field(default_factory=dict)

    def add(self, name: str, handler: Handler, doc: str, params: Sequence[str] = ()) -> MethodTable:
        if name in self.methods:
            raise ValueError(f"RPC method {name!r} is already registered")
        self.methods[name] = Method(name, handler, doc, tuple(params))
        return self

    def update(self, handlers: Mapping[str, Handler]) -> MethodTable:
        """Add a consumer's ``{name: handler}`` (e.g. ``usrloc_rpc.rpc_methods(service)``); the
        help text is the first line of each handler's docstring."""
        for name, handler in handlers.items():
            doc = (handler.__doc__ or "").strip().split("\n", 1)[0]
            self.add(name, handler, doc)
        return self

    def get(self, name: str) -> Method | None:
        return self.methods.get(name)

    def names(self) -> list[str]:
        """Sorted, as Kamailio's ``system.listMethods``."""
        return sorted(self.methods)

    def __contains__(self, name: object) -> bool:
        return name in self.methods


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply body and, for an error, its code (the HTTP server maps it to a status)."""

    body: bytes
    error_code: int | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None


def _envelope(member: str, value: object, request_id: object) -> bytes:
    reply: dict[str, object] = {"jsonrpc": "2.0", member: value}
    if request_id is not _NO_ID:
        reply["id"] = request_id
    return format_json(reply).encode("utf-8")


def error_body(code: int, message: str, request_id: object = None) -> bytes:
    """``{"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": request_id}``."""
    return _envelope("error", {"code": code, "message": message}, request_id)


def _error(code: int, message: str, request_id: object = None) -> Reply:
    return Reply(error_body(code, message, request_id), code, message)


def http_status_of(code: int) -> int:
    """The HTTP status of an error reply: the fault code itself when it is one (Kamailio sends
    ``500 Invalid Parameters`` as HTTP ``500 Invalid Parameters``), 400 for the request errors
    -32700/-32600, 500 otherwise."""
    if 100 <= code <= 599:
        return code
    if code in (PARSE_ERROR, INVALID_REQUEST):
        return 400
    return 500


# ---------------------------------------------------------------------------------------------
# Dispatch


def _valid_id(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # 1e400 parses as inf, which JSON cannot carry back
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


class Dispatcher:
    """Decode one request, run its method, encode the reply. Never raises."""

    def __init__(self, table: MethodTable) -> None:
        self.table = table

    async def handle(self, data: bytes) -> Reply:
        try:
            request = json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _error(PARSE_ERROR, "Parse Error")
        if not isinstance(request, dict):
            # a batch (array) too: jsonrpcs has none
            return _error(INVALID_REQUEST, "Invalid Request")
        request_id = request.get("id", _NO_ID)
        if request_id is not _NO_ID and not _valid_id(request_id):
            return _error(INVALID_REQUEST, "Invalid Request")
        name = request.get("method")
        params = request.get("params", [])
        if (
            request.get("jsonrpc") != "2.0"
            or not isinstance(name, str)
            or not isinstance(params, list | dict)
        ):
            bad_id = None if request_id is _NO_ID else request_id
            return _error(INVALID_REQUEST, "Invalid Request", bad_id)
        method = self.table.get(name)
        if method is None:
            return _error(500, "Method Not Found", request_id)
        try:
            result = await self._call(method, params)
            return Reply(_envelope("result", result, request_id))
        except RpcFault as fault:
            return _error(fault.code, fault.message, request_id)
        except Exception:
            log.exception("RPC %s failed", name)
            return _error(INTERNAL_ERROR, "Internal Error", request_id)

    async def _call(self, method: Method, params: list[object] | dict[str, object]) -> object:
        if isinstance(params, dict):
            unknown = [key for key in params if key not in method.params]
            if unknown:
                raise RpcFault(500, "Invalid Parameters")
            given = [params.get(name) for name in method.params]
            while given and given[-1] is None:
                given.pop()
            positional: Params = given
        else:
            positional = list(params)
        result = method.handler(positional)
        if inspect.isawaitable(result):
            result = await _awaited(result)
        return result


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable
