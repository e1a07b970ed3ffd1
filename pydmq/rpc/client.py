"""A small blocking JSON-RPC client for pydmq's listeners (and Kamailio's jsonrpcs ones).

::

    from pydmq.rpc.client import call
    nodes = call("dmq.list_nodes", http="127.0.0.1:5080")
    call("dmq.remove", ["sip:10.0.0.7:5060"], unix="/run/pydmq/rpc.sock")

:func:`call` returns the ``result`` or raises :class:`~pydmq.dmq.nodelist.RpcFault` (the
``error`` member's code and message); :func:`request` returns the whole reply, raw and parsed.
Transport problems (nothing listening, a timeout, a reply that is not JSON-RPC) raise
:class:`RpcClientError`.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydmq.dmq.nodelist import RpcFault

__all__ = [
    "DEFAULT_HTTP",
    "RpcClientError",
    "RpcFault",
    "RpcResponse",
    "call",
    "request",
]

DEFAULT_HTTP = "127.0.0.1:5080"
#: Largest reply read from the unix socket.
MAX_DATAGRAM = 4 * 1024 * 1024

_ids = itertools.count(1)


class RpcClientError(Exception):
    """The call did not get a JSON-RPC reply (connection, timeout, garbage)."""


@dataclass(frozen=True, slots=True)
class RpcResponse:
    """``raw``: the reply body as received; ``data``: it parsed."""

    raw: bytes
    data: dict[str, Any]

    @property
    def error(self) -> RpcFault | None:
        err = self.data.get("error")
        if err is None:
            return None
        if isinstance(err, dict):
            code = err.get("code")
            return RpcFault(
                code if isinstance(code, int) else 0, str(err.get("message", "unknown error"))
            )
        return RpcFault(0, str(err))

    @property
    def result(self) -> Any:
        return self.data.get("result")


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdecimal():
        raise RpcClientError(f"not host:port: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def request(
    method: str,
    params: Sequence[object] | Mapping[str, object] = (),
    *,
    http: str | None = None,
    unix: str | None = None,
    timeout: float = 5.0,
    request_id: int | str | None = None,
) -> RpcResponse:
    """Send one request over HTTP (``http="host:port"``, the default being
    ``127.0.0.1:5080``) or the unix datagram socket ``unix``; return the reply."""
    if http is not None and unix is not None:
        raise ValueError("give http or unix, not both")
    payload: dict[str, object] = {
        "jsonrpc": "2.0",
        "method": method,
        "params": dict(params) if isinstance(params, Mapping) else list(params),
        "id": request_id if request_id is not None else next(_ids),
    }
    body = json.dumps(payload).encode("utf-8")
    raw = (
        _unix(unix, body, timeout)
        if unix is not None
        else _http(http or DEFAULT_HTTP, body, timeout)
    )
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RpcClientError(f"reply is not JSON: {raw[:200]!r}") from exc
    if not isinstance(data, dict) or ("result" not in data and "error" not in data):
        raise RpcClientError(f"reply is not a JSON-RPC reply: {raw[:200]!r}")
    return RpcResponse(raw, data)


def call(
    method: str,
    params: Sequence[object] | Mapping[str, object] = (),
    *,
    http: str | None = None,
    unix: str | None = None,
    timeout: float = 5.0,
) -> Any:
    """The ``result`` of ``method``; raises :class:`RpcFault` on an ``error`` reply."""
    response = request(method, params, http=http, unix=unix, timeout=timeout)
    fault = response.error
    if fault is not None:
        raise fault
    return response.result


def _http(address: str, body: bytes, timeout: float) -> bytes:
    host, port = _split(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/RPC", body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
    except (OSError, http.client.HTTPException) as exc:
        raise RpcClientError(f"HTTP {address}: {exc}") from exc
    finally:
        conn.close()
    if not data:
        raise RpcClientError(f"HTTP {address}: {reply.status} {reply.reason} without a body")
    return data


def _unix(path: str, body: bytes, timeout: float) -> bytes:
    # The reply comes back to our own bound address: a socket in a private directory.
    workdir = tempfile.mkdtemp(prefix="pydmq-rpc-")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(os.path.join(workdir, "c.sock"))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_DATAGRAM)
            try:
                sock.sendto(body, path)
            except OSError as exc:
                raise RpcClientError(f"unix {path}: {exc}") from exc
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RpcClientError(f"unix {path}: no reply within {timeout:g}s")
                sock.settimeout(remaining)
                try:
                    # only the server can reach a socket in our private (0700) directory
                    return sock.recv(MAX_DATAGRAM)
                except TimeoutError:
                    continue
                except OSError as exc:
                    raise RpcClientError(f"unix {path}: {exc}") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
