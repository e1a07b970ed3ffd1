"""Run sipp (Debian package ``sip-tester``) with a scenario generated for one request.

Typical use::

    from tests.support.sipp import sipp_request

    res = sipp_request("127.0.0.1", port, "KDMQ", user="nochannel",
                       body="x", expect_code=404, expect_reason="User Not Found",
                       workdir=tmp_path)
    assert res.ok, res.explain()
    res.responses   # ["SIP/2.0 404 User Not Found", ...] received status lines
    res.stats["SuccessfulCall(C)"]

sipp's own exit code tells whether the scenario passed: 0 every call succeeded, 1 some call
failed (wrong code, reason regexp not matching, timeout), other values are sipp errors.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .net import free_port

__all__ = ["SIPP_BIN", "SippResult", "build_scenario", "run_sipp", "sipp_request"]

SIPP_BIN = os.environ.get("PYDMQ_SIPP_BIN", "sipp")

SippTransport = Literal["udp", "tcp", "tls"]
_TRANSPORT_FLAG = {"udp": "u1", "tcp": "t1", "tls": "l1"}


@dataclass
class SippResult:
    """Outcome of one sipp run."""

    returncode: int
    stats: dict[str, str]  # last row of sipp's -trace_stat CSV (column name -> value)
    messages: str  # sipp's -trace_msg log: every message sent and received
    errors: str  # sipp's -trace_err log: unexpected messages
    stdout: str
    stderr: str
    args: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def responses(self) -> list[str]:
        """Status lines of the responses sipp received, in order (expected or not)."""
        return re.findall(r"^(SIP/2\.0 \d{3}[^\r\n]*)", self.messages, re.M)

    @property
    def successful_calls(self) -> int:
        return int(self.stats.get("SuccessfulCall(C)", "0") or 0)

    @property
    def failed_calls(self) -> int:
        return int(self.stats.get("FailedCall(C)", "0") or 0)

    def explain(self) -> str:
        """Everything useful for an assertion message."""
        return (
            f"sipp exit {self.returncode}: {' '.join(self.args)}\n"
            f"responses: {self.responses}\n"
            f"--- messages:\n{self.messages[-4000:]}\n--- errors:\n{self.errors[-2000:]}\n"
            f"--- stderr:\n{self.stderr[-2000:]}\n--- stdout (tail):\n{self.stdout[-1500:]}"
        )


def _cdata(text: str) -> str:
    # "]]>" cannot appear inside CDATA: split it over two sections.
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _posix_escape(text: str) -> str:
    """Escape ``text`` for a POSIX extended regular expression (sipp's ``ereg``)."""
    out = []
    for ch in text:
        if ch == "^":
            out.append("\\^")
        elif ch in ".[]()*+?{}|$\\":
            out.append(f"[{ch}]")
        else:
            out.append(ch)
    return "".join(out)


def _attr(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


def build_scenario(
    method: str,
    *,
    user: str = "[service]",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: str = "",
    content_type: str | None = None,
    max_forwards: int | None = 70,
    expect_code: int = 200,
    expect_reason: str | None = None,
    transport_param: bool = False,
) -> str:
    """A sipp scenario: send one ``method`` request to ``sip:<user>@[remote_ip]:[remote_port]``
    and expect a final response ``expect_code`` (1xx responses are skipped).

    ``expect_reason`` is matched exactly against the reason phrase (sipp fails the call
    otherwise). ``body`` lines end in CRLF on the wire (sipp rewrites line ends), sipp strips
    leading whitespace from every line and computes Content-Length itself. With
    ``transport_param`` the R-URI gets ``;transport=[transport]``.
    """
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if content_type is not None:
        items.append(("Content-Type", content_type))
    ruri = f"sip:{user}@[remote_ip]:[remote_port]"
    if transport_param:
        ruri += ";transport=[transport]"
    lines = [
        f"{method} {ruri} SIP/2.0",
        "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport",
        "From: <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]",
        f"To: <sip:{user}@[remote_ip]:[remote_port]>",
        "Call-ID: [call_id]",
        f"CSeq: 1 {method}",
    ]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines += [f"{name}: {value}" for name, value in items]
    lines.append("Content-Length: [len]")
    message = "\n".join(lines) + "\n\n" + body
    if expect_reason is not None:
        # sipp matches the whole message; the status line ends in CR LF
        regexp = f"^SIP/2[.]0 {expect_code} {_posix_escape(expect_reason)}[[:space:]]"
        recv_final = (
            f'  <recv response="{expect_code}">\n'
            "    <action>\n"
            f'      <ereg regexp="{_attr(regexp)}" search_in="msg" check_it="true"'
            ' assign_to="status_line"/>\n'
            "    </action>\n"
            "  </recv>\n"
            # sipp refuses a variable that is assigned once and never read
            '  <Reference variables="status_line"/>\n'
        )
    else:
        recv_final = f'  <recv response="{expect_code}"/>\n'
    return (
        '<?xml version="1.0" encoding="ISO-8859-1" ?>\n'
        '<!DOCTYPE scenario SYSTEM "sipp.dtd">\n'
        f'<scenario name="pydmq {_attr(method)}">\n'
        '  <send retrans="500">\n'
        f"    {_cdata(message)}\n"
        "  </send>\n"
        '  <recv response="100" optional="true"/>\n'
        f"{recv_final}"
        "</scenario>\n"
    )


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _last_stats(path: Path) -> dict[str, str]:
    text = _read(path)
    rows = list(csv.reader(text.splitlines(), delimiter=";"))
    rows = [r for r in rows if r]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def run_sipp(
    host: str,
    port: int,
    scenario_xml: str,
    *,
    transport: SippTransport = "udp",
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    service: str = "service",
    calls: int = 1,
    timeout: float = 10.0,
    workdir: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    extra_args: Iterable[str] = (),
) -> SippResult:
    """Run sipp once against host:port with ``scenario_xml``; bounded by ``timeout`` seconds.

    sipp gets ``-m calls -timeout <timeout>s -timeout_error`` and is killed (its whole process
    group) if it outlives ``timeout + 5`` seconds. Files go to ``workdir`` (a temp dir,
    removed afterwards, if None). For TLS give ``tls_cert``/``tls_key`` (sipp always presents
    a certificate and does not verify the server's).
    """
    binary = shutil.which(SIPP_BIN)
    if binary is None:
        raise RuntimeError(
            f"{SIPP_BIN!r} not found on PATH: install the Debian package 'sip-tester' "
            "(scripts/test.sh does)"
        )
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="sipp-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    scen = Path(tempfile.mkstemp(prefix="scenario-", suffix=".xml", dir=wd)[1])
    scen.write_text(scenario_xml, encoding="iso-8859-1")
    stem = scen.with_suffix("")
    stat_file = Path(f"{stem}.stat.csv")
    msg_file = Path(f"{stem}.messages.log")
    err_file = Path(f"{stem}.errors.log")
    args = [
        binary,
        f"{host}:{port}",
        "-sf", str(scen),
        "-t", _TRANSPORT_FLAG[transport],
        "-i", local_ip,
        # sipp's default local port is 5060 (also for -p 0): always pick a free one
        "-p", str(local_port or free_port("both", local_ip)),
        "-s", service,
        "-m", str(calls),
        "-l", str(calls),
        "-timeout", f"{max(1, round(timeout))}s",
        "-timeout_error",
        "-recv_timeout", f"{max(1, round(timeout))}s",
        "-nostdin",
        "-trace_stat", "-stf", str(stat_file),
        "-trace_msg", "-message_file", str(msg_file),
        "-trace_err", "-error_file", str(err_file),
    ]  # fmt: skip
    if transport == "tls":
        if tls_cert is None or tls_key is None:
            raise ValueError("sipp over TLS needs tls_cert and tls_key")
        args += ["-tls_cert", str(tls_cert), "-tls_key", str(tls_key)]
    args += list(extra_args)
    proc = subprocess.Popen(
        args,
        cwd=wd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(os.environ, TERM="dumb"),
    )
    try:
        out, err = proc.communicate(timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    result = SippResult(
        returncode=proc.returncode,
        stats=_last_stats(stat_file),
        messages=_read(msg_file),
        errors=_read(err_file),
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        args=args,
    )
    if own_dir:
        shutil.rmtree(wd, ignore_errors=True)
    return result


def sipp_request(
    host: str,
    port: int,
    method: str,
    *,
    user: str = "service",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: str = "",
    content_type: str | None = None,
    max_forwards: int | None = 70,
    expect_code: int = 200,
    expect_reason: str | None = None,
    transport: SippTransport = "udp",
    timeout: float = 10.0,
    workdir: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> SippResult:
    """Send one request with sipp and check the final response code (and reason)."""
    scenario = build_scenario(
        method,
        user=user,
        headers=headers,
        body=body,
        content_type=content_type,
        max_forwards=max_forwards,
        expect_code=expect_code,
        expect_reason=expect_reason,
        transport_param=transport != "udp",
    )
    return run_sipp(
        host,
        port,
        scenario,
        transport=transport,
        timeout=timeout,
        workdir=workdir,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
