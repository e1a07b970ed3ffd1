"""``pydmq rpc``: call a node's JSON-RPC method from the shell, like ``kamcmd`` / ``kamcli``.

::

    pydmq rpc dmq.list_nodes                      # a table
    pydmq rpc --json dmq.list_nodes               # the reply exactly as the server sent it
    pydmq rpc --unix /run/pydmq/rpc.sock dmq.remove sip:10.0.0.7:5060

Where to call: ``--http HOST:PORT`` or ``--unix PATH``; without either, the ``[rpc]`` listeners of
the configuration ``pydmq run`` would use (``-c FILE``, ``$PYDMQ_CONFIG``, ``PYDMQ_RPC_*``): the
unix socket when one is set, else the HTTP address (default ``127.0.0.1:5080``).

Exit status: 0 for a result, 1 for a JSON-RPC error (its code and message go to stderr), 2 for a
usage or configuration error, 3 when no reply came (nothing listening, timeout, not JSON-RPC).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

from pydmq.config import CONFIG_ENV, ConfigError, load_settings
from pydmq.rpc.client import RpcClientError, RpcResponse, request

__all__ = ["add_arguments", "render", "run"]

EXIT_FAULT = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--http", metavar="HOST:PORT", help="call over HTTP (POST /RPC)")
    where.add_argument("--unix", metavar="PATH", help="call over the unix datagram socket PATH")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="without --http/--unix: take the listener from this TOML file's [rpc]",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON-RPC reply")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)"
    )
    parser.add_argument("method", metavar="METHOD", help="e.g. dmq.list_nodes")
    parser.add_argument(
        "params", metavar="ARG", nargs="*", help="positional parameters, sent as strings"
    )


def _target(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(http, unix) to call; raises ConfigError when the configuration has neither."""
    if args.http or args.unix:
        return args.http, args.unix
    path = args.config or os.environ.get(CONFIG_ENV) or None
    settings, _warnings = load_settings(path, os.environ, [])
    if settings.rpc.unix_socket:
        return None, settings.rpc.unix_socket
    if settings.rpc.http_address:
        return settings.rpc.http_address, None
    raise ConfigError("no RPC listener configured ([rpc] http_address and unix_socket are unset)")


def run(args: argparse.Namespace) -> int:
    try:
        http, unix = _target(args)
    except ConfigError as exc:
        print(f"pydmq rpc: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        response = request(args.method, args.params, http=http, unix=unix, timeout=args.timeout)
    except RpcClientError as exc:
        print(f"pydmq rpc: no reply: {exc}", file=sys.stderr)
        return EXIT_NO_REPLY
    code = _print(response, raw=args.json)
    if code == 0 and args.method == "htable.dmqsync" and not args.json:
        try:
            _sync_progress(http, unix, args.timeout)
        except RpcClientError as exc:
            print(f"pydmq rpc: progress unavailable: {exc}", file=sys.stderr)
    return code


#: How long without a new sync group before the progress display gives up waiting.
SYNC_QUIET = 3.0


def _sync_progress(http: str | None, unix: str | None, timeout: float) -> None:
    """Draw a progress bar of the sync just requested until every asked node's answer ended
    (its empty final group) or nothing arrived for :data:`SYNC_QUIET` seconds (Kamailio's last
    group may carry cells, so only quiet tells its answer is over)."""
    width = 30
    last_groups, quiet_since = -1, time.monotonic()
    while True:
        status = request("htable.syncstatus", [], http=http, unix=unix, timeout=timeout).result
        if not isinstance(status, dict):
            return
        asked, done = int(status.get("asked", 0)), int(status.get("finished", 0))
        groups, cells = int(status.get("groups", 0)), int(status.get("cells", 0))
        filled = width if asked == 0 else min(width, width * done // asked)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{asked} nodes done, {cells:,} cells in {groups} groups")
        sys.stderr.flush()
        now = time.monotonic()
        if groups != last_groups:
            last_groups, quiet_since = groups, now
        if done >= asked or now - quiet_since > SYNC_QUIET:
            sys.stderr.write("\n")
            return
        time.sleep(0.2)  # polling a remote process: there is no event to wait on


def _print(response: RpcResponse, *, raw: bool) -> int:
    fault = response.error
    if raw:
        text = response.raw.decode("utf-8", "replace")
        print(text if text.endswith("\n") else text + "\n", end="")
    if fault is not None:
        print(f"error: {fault.code} {fault.message}", file=sys.stderr)
        return EXIT_FAULT
    if not raw:
        out = render(response.result)
        if out:
            print(out)
    return 0


# ---------------------------------------------------------------------------------------------
# Readable output


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _table(rows: Sequence[Mapping[str, object]], indent: str = "") -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return indent + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(columns), *(line(r) for r in cells)]


def _is_table(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(r, dict) and all(_scalar(v) for v in r.values()) for r in value)
    )


def _tree(data: Mapping[str, object], depth: int = 0) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.extend(_tree(value, depth + 1))
        elif _is_table(value):
            lines.append(f"{pad}{key}:")
            assert isinstance(value, list)
            lines.extend(_table(value, pad + "  "))
        elif isinstance(value, list) and all(_scalar(v) for v in value):
            lines.append(f"{pad}{key}: {', '.join(_cell(v) for v in value)}")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key}: {{}}")
        else:
            lines.append(f"{pad}{key}: {_cell(value)}")
    return lines


def render(result: object) -> str:
    """A result for people: text as is, a list of flat structs as a table with one column per
    member (``-`` for an empty value), a struct as ``key: value`` lines, a list of scalars one
    per line."""
    if isinstance(result, str):
        return result
    if _is_table(result):
        assert isinstance(result, list)
        return "\n".join(_table(result))
    if isinstance(result, list) and all(_scalar(v) for v in result):
        return "\n".join(_cell(v) for v in result)
    if isinstance(result, dict):
        return "\n".join(_tree(result))
    if _scalar(result):
        return _cell(result)
    return json.dumps(result, indent=2, ensure_ascii=False)
