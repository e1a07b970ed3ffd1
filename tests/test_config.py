"""pydmq.config: defaults, sources and their precedence, validation messages."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
from pathlib import Path

import pytest

from pydmq.config import (
    ConfigError,
    DmqSettings,
    HtableSettings,
    HtableSpec,
    LogSettings,
    RpcSettings,
    Settings,
    SipSettings,
    TmSettings,
    UsrlocSettings,
    add_cli_arguments,
    load_settings,
    parse_htable_spec,
    settings_from_args,
    settings_from_mapping,
)

KAMAILIO_MODPARAMS = {
    # kamailio-dmq-module.txt section 3: name -> documented default
    "server_address": None,  # NULL in Kamailio; pydmq has its own default (tested below)
    "server_socket": None,
    "notification_address": (),
    "notification_channel": "notification_peer",
    "multi_notify": False,
    "num_workers": 2,
    "worker_usleep": 0,
    "ping_interval": 60,
    "remove_inactive": True,
    "fail_count_enabled": False,
    "fail_count_threshold_not_active": 0,
    "fail_count_threshold_disabled": 1,
}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pydmq.toml"
    path.write_text(text)
    return str(path)


def load_toml(tmp_path: Path, text: str, environ=None, overrides=()):
    return load_settings(write(tmp_path, text), environ or {}, list(overrides))


def error_of(tmp_path: Path, text: str, environ=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path, text, environ, overrides)
    return str(info.value)


def cli(argv: list[str], environ=None):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return settings_from_args(parser.parse_args(argv), environ or {})


# ---- defaults ----------------------------------------------------------------------------------


def test_defaults_match_kamailio_documentation():
    d = Settings().dmq
    for name, default in KAMAILIO_MODPARAMS.items():
        if name != "server_address":
            assert getattr(d, name) == default, name
    assert d.server_address == "sip:127.0.0.1:5060"


def test_dmq_table_uses_every_modparam_name():
    names = {f.name for f in dataclasses.fields(DmqSettings)}
    assert set(KAMAILIO_MODPARAMS) <= names


def test_other_defaults():
    s = Settings()
    assert s.dmq.allowed_sources == (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    assert s.dmq.max_queue == 10000
    assert s.tm == TmSettings(t1=0.5, t2=4.0, t4=5.0, fr_timer=30.0)
    assert s.sip.max_message_size == 65535
    assert s.sip.max_headers == 100
    assert s.sip.tls_certfile is None
    assert s.sip.tls_verify_client is False
    assert s.rpc.http_address == "127.0.0.1:5080"
    assert s.rpc.unix_socket is None
    assert s.log.level == "INFO"


def test_no_sources_gives_defaults_without_warnings():
    assert load_settings(None, {}, []) == (Settings(), [])


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().dmq.ping_interval = 5  # type: ignore[misc]


def test_to_dict_is_plain_json():
    d = Settings().to_dict()
    json.dumps(d)
    assert {"dmq", "tm", "sip", "rpc", "log", "usrloc"} <= set(d)
    assert d["dmq"]["allowed_sources"] == ["0.0.0.0/0", "::/0"]
    assert d["dmq"]["notification_address"] == []
    assert d["dmq"]["server_socket"] is None
    assert d["dmq"]["ping_interval"] == 60


# ---- every parameter from TOML -----------------------------------------------------------------


def test_every_parameter_from_toml(tmp_path: Path):
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    ca = tmp_path / "ca.pem"
    for f in (cert, key, ca):
        f.write_text("x")
    settings, warnings = load_toml(
        tmp_path,
        f"""
[dmq]
server_address = "sip:10.0.0.20:5061;transport=tls"
server_socket = "tls:10.0.0.20:5061"
notification_address = ["sip:10.0.0.21:5061;transport=tls"]
notification_channel = "peers"
multi_notify = 1
num_workers = 4
worker_usleep = 1000
ping_interval = 90
remove_inactive = 0
fail_count_enabled = true
fail_count_threshold_not_active = 100
fail_count_threshold_disabled = 105
allowed_sources = ["10.0.0.0/24", "2001:db8::/32"]
max_queue = 50

[tm]
t1 = 0.25
t2 = 2
t4 = 2.5
fr_timer = 10

[sip]
max_message_size = 4096
max_headers = 50
max_line = 1024
tcp_idle_timeout = 30
tls_certfile = "{cert}"
tls_keyfile = "{key}"
tls_cafile = "{ca}"
tls_verify_client = true

[rpc]
http_address = "[::1]:8080"
unix_socket = "/run/pydmq/rpc.sock"

[log]
level = "debug"
""",
    )
    assert warnings == []
    assert settings == Settings(
        dmq=DmqSettings(
            server_address="sip:10.0.0.20:5061;transport=tls",
            server_socket="tls:10.0.0.20:5061",
            notification_address=("sip:10.0.0.21:5061;transport=tls",),
            notification_channel="peers",
            multi_notify=True,
            num_workers=4,
            worker_usleep=1000,
            ping_interval=90,
            remove_inactive=False,
            fail_count_enabled=True,
            fail_count_threshold_not_active=100,
            fail_count_threshold_disabled=105,
            allowed_sources=(
                ipaddress.ip_network("10.0.0.0/24"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
            max_queue=50,
        ),
        tm=TmSettings(t1=0.25, t2=2.0, t4=2.5, fr_timer=10.0),
        sip=SipSettings(
            max_message_size=4096,
            max_headers=50,
            max_line=1024,
            tcp_idle_timeout=30.0,
            tls_certfile=str(cert),
            tls_keyfile=str(key),
            tls_cafile=str(ca),
            tls_verify_client=True,
        ),
        rpc=RpcSettings(http_address="[::1]:8080", unix_socket="/run/pydmq/rpc.sock"),
        log=LogSettings(level="DEBUG"),
    )
    assert isinstance(settings.tm.t2, float)


def test_empty_string_disables_optional_settings(tmp_path: Path):
    settings, _ = load_toml(tmp_path, '[rpc]\nhttp_address = ""\n[dmq]\nserver_socket = ""\n')
    assert settings.rpc.http_address is None
    assert settings.dmq.server_socket is None


@pytest.mark.parametrize(
    ("toml_value", "expected"),
    [
        ('"sip:10.0.0.21:5060"', ("sip:10.0.0.21:5060",)),
        (
            '["sip:10.0.0.21:5060", "sip:10.0.0.22:5060"]',
            ("sip:10.0.0.21:5060", "sip:10.0.0.22:5060"),
        ),
        ("[]", ()),
    ],
)
def test_notification_address_string_or_list(tmp_path: Path, toml_value, expected):
    settings, _ = load_toml(tmp_path, f"[dmq]\nnotification_address = {toml_value}\n")
    assert settings.dmq.notification_address == expected


def test_settings_from_mapping():
    settings, _ = settings_from_mapping({"dmq": {"num_workers": 0}})
    assert settings.dmq.num_workers == 0


# ---- precedence --------------------------------------------------------------------------------


def test_env_overrides_toml(tmp_path: Path):
    settings, _ = load_toml(
        tmp_path,
        "[dmq]\nping_interval = 90\nnum_workers = 3\n",
        {
            "PYDMQ_DMQ_PING_INTERVAL": "120",
            "PYDMQ_DMQ_NOTIFICATION_ADDRESS": "sip:10.0.0.1:5060, sip:10.0.0.2:5060",
            "PYDMQ_DMQ_MULTI_NOTIFY": "false",
            "PYDMQ_DMQ_REMOVE_INACTIVE": "0",
            "PYDMQ_TM_FR_TIMER": "12.5",
            "PYDMQ_RPC_UNIX_SOCKET": "/tmp/x.sock",
        },
    )
    assert settings.dmq.ping_interval == 120
    assert settings.dmq.num_workers == 3  # from the file, untouched
    assert settings.dmq.notification_address == ("sip:10.0.0.1:5060", "sip:10.0.0.2:5060")
    assert settings.dmq.remove_inactive is False
    assert settings.tm.fr_timer == 12.5
    assert settings.rpc.unix_socket == "/tmp/x.sock"


def test_env_list_replaces_toml_list(tmp_path: Path):
    settings, _ = load_toml(
        tmp_path,
        '[dmq]\nnotification_address = ["sip:10.0.0.1:5060", "sip:10.0.0.2:5060"]\n',
        {"PYDMQ_DMQ_NOTIFICATION_ADDRESS": "sip:10.0.0.9:5060"},
    )
    assert settings.dmq.notification_address == ("sip:10.0.0.9:5060",)


def test_unrelated_pydmq_env_vars_are_ignored():
    env = {"PYDMQ_CONFIG": "", "PYDMQ_KAMAILIO_BIN": "/usr/sbin/kamailio", "PYDMQ": "1"}
    assert load_settings(None, env, [])[0] == Settings()


def test_cli_set_overrides_env(tmp_path: Path):
    settings, _ = load_toml(
        tmp_path,
        "[dmq]\nping_interval = 90\n",
        {"PYDMQ_DMQ_PING_INTERVAL": "120"},
        ["dmq.ping_interval=150", "log.level=warning", "dmq.ping_interval=180"],
    )
    assert settings.dmq.ping_interval == 180  # the last --set wins
    assert settings.log.level == "WARNING"


def test_cli_flags(tmp_path: Path):
    path = write(
        tmp_path, '[dmq]\nping_interval = 90\nnotification_address = "sip:10.0.0.1:5060"\n'
    )
    settings, warnings = cli(
        [
            "-c",
            path,
            "--set",
            "dmq.ping_interval=100",
            "--ping-interval",
            "200",
            "--server-address",
            "sip:10.0.0.5:5070",
            "--notification-address",
            "sip:10.0.0.7:5060",
            "--notification-address",
            "sip:10.0.0.8:5060",
        ],
        {"PYDMQ_DMQ_PING_INTERVAL": "120", "PYDMQ_DMQ_SERVER_ADDRESS": "sip:10.0.0.4:5060"},
    )
    assert warnings == []
    assert settings.dmq.ping_interval == 200  # convenience flag beats --set beats env beats file
    assert settings.dmq.server_address == "sip:10.0.0.5:5070"
    assert settings.dmq.notification_address == ("sip:10.0.0.7:5060", "sip:10.0.0.8:5060")


def test_cli_without_flags_gives_defaults():
    assert cli([]) == (Settings(), [])


def test_config_path_from_environment(tmp_path: Path):
    path = write(tmp_path, "[dmq]\nping_interval = 75\n")
    assert cli([], {"PYDMQ_CONFIG": path})[0].dmq.ping_interval == 75
    other = tmp_path / "other.toml"
    other.write_text("[dmq]\nping_interval = 85\n")
    assert cli(["--config", str(other)], {"PYDMQ_CONFIG": path})[0].dmq.ping_interval == 85


def test_bad_cli_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match=r'dmq\.ping_interval = "soon": .*--ping-interval'):
        cli(["--ping-interval", "soon"])


def test_overridden_bad_value_is_still_an_error(tmp_path: Path):
    message = error_of(tmp_path, "[dmq]\nping_interval = -1\n", {"PYDMQ_DMQ_PING_INTERVAL": "90"})
    assert "dmq.ping_interval = -1" in message


# ---- unknown names -----------------------------------------------------------------------------


def test_unknown_key_in_toml(tmp_path: Path):
    message = error_of(tmp_path, "[dmq]\nping_intervall = 90\n")
    assert "dmq.ping_intervall" in message
    assert "did you mean ping_interval?" in message
    assert "pydmq.toml" in message


def test_unknown_table_in_toml(tmp_path: Path):
    message = error_of(tmp_path, "[dmqq]\nping_interval = 90\n")
    assert "[dmqq]" in message
    assert "did you mean dmq?" in message


def test_nested_table_is_an_unknown_key(tmp_path: Path):
    assert "dmq.extra" in error_of(tmp_path, "[dmq.extra]\nx = 1\n")


def test_top_level_key_in_toml(tmp_path: Path):
    message = error_of(tmp_path, "ping_interval = 90\n")
    assert "ping_interval" in message
    assert "[dmq]" in message


def test_unknown_env_key():
    with pytest.raises(ConfigError, match=r"dmq\.pingg_interval .*PYDMQ_DMQ_PINGG_INTERVAL"):
        load_settings(None, {"PYDMQ_DMQ_PINGG_INTERVAL": "90"}, [])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dmq.nope=1", "dmq.nope"),
        ("nope.ping_interval=1", "[nope]"),
        ("dmq.ping_interval", "TABLE.KEY=VALUE"),
        ("ping_interval=5", "TABLE.KEY=VALUE"),
    ],
)
def test_bad_set_override(override, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(None, {}, [override])
    assert expected in str(info.value)


# ---- bad values: one message naming parameter, value and what is allowed -----------------------

BAD_VALUES = [
    # (table, key, TOML value, substrings of the message)
    ("dmq", "ping_interval", "-3", ["dmq.ping_interval = -3", "from 1 to 86400", "minimum 60"]),
    ("dmq", "ping_interval", "0", ["dmq.ping_interval = 0", "from 1 to 86400"]),
    ("dmq", "ping_interval", "86401", ["dmq.ping_interval = 86401", "from 1 to 86400"]),
    ("dmq", "ping_interval", '"60"', ['dmq.ping_interval = "60"', "must be an integer"]),
    ("dmq", "ping_interval", "60.5", ["dmq.ping_interval = 60.5", "must be an integer"]),
    ("dmq", "num_workers", "-1", ["dmq.num_workers = -1", "from 0 to 1024", "inline"]),
    ("dmq", "worker_usleep", "-5", ["dmq.worker_usleep = -5", "microseconds"]),
    ("dmq", "max_queue", "0", ["dmq.max_queue = 0", "from 1"]),
    ("dmq", "fail_count_threshold_disabled", "-1", ["fail_count_threshold_disabled = -1"]),
    ("dmq", "multi_notify", "2", ["dmq.multi_notify = 2", "true, false, 1 or 0"]),
    ("dmq", "remove_inactive", '"yes"', ['dmq.remove_inactive = "yes"', "boolean"]),
    ("dmq", "server_address", '"http://10.0.0.1:80"', ["dmq.server_address", "sip: or sips:"]),
    ("dmq", "server_address", '"sip:10.0.0.1"', ['"sip:10.0.0.1"', "explicit port", "host:;"]),
    ("dmq", "server_address", '"sip:10.0.0.1:"', ['"sip:10.0.0.1:"', "no port number"]),
    (
        "dmq",
        "server_address",
        '"sip:10.0.0.1:5060;transport=udp"',
        ["transport=udp", "duplicate", "5.6.3"],
    ),
    ("dmq", "server_address", '"sip:10.0.0.1:5060;transport=ws"', ["transport=ws", "tcp or tls"]),
    ("dmq", "server_address", '"sip:0.0.0.0:5060"', ["0.0.0.0", "advertised"]),
    ("dmq", "server_address", '"sip:10.0.0.1:70000"', ["'70000'", "1 to 65535"]),
    ("dmq", "server_address", '"sip:10.0.0.300:5060"', ["10.0.0.300", "IPv4"]),
    ("dmq", "server_address", '"sip:::1:5060"', ["IPv6", "brackets"]),
    ("dmq", "server_address", "5060", ["dmq.server_address = 5060", "must be a string"]),
    ("dmq", "server_socket", '"sctp:10.0.0.1:5060"', ["dmq.server_socket", "udp, tcp or tls"]),
    ("dmq", "server_socket", '"udp:10.0.0.1:x"', ["dmq.server_socket", "'x'"]),
    ("dmq", "notification_address", '"10.0.0.1:5060"', ["notification_address", "sip:"]),
    (
        "dmq",
        "notification_address",
        '["sip:10.0.0.1:5060", "sip:10.0.0.2:5060;transport=udp"]',
        ['item "sip:10.0.0.2:5060;transport=udp"', "transport=udp"],
    ),
    ("dmq", "notification_address", "[1]", ["notification_address = [1]", "list"]),
    ("dmq", "notification_channel", '"a b"', ['notification_channel = "a b"', "user part"]),
    ("dmq", "notification_channel", '""', ["notification_channel", "non-empty"]),
    ("dmq", "allowed_sources", '["10.0.0.1/24"]', ['"10.0.0.1/24"', "CIDR", "host bits"]),
    ("dmq", "allowed_sources", '"everyone"', ['"everyone"', "CIDR"]),
    ("dmq", "allowed_sources", "[]", ["allowed_sources = []", "at least one"]),
    ("tm", "t1", "0", ["tm.t1 = 0", "greater than 0"]),
    ("tm", "fr_timer", "30000", ["tm.fr_timer = 30000", "not milliseconds"]),
    ("tm", "t2", "true", ["tm.t2 = true", "seconds"]),
    ("sip", "max_message_size", "100", ["sip.max_message_size = 100", "from 1024"]),
    ("sip", "tcp_idle_timeout", "-1", ["sip.tcp_idle_timeout = -1", "seconds"]),
    ("sip", "udp_children", "65", ["sip.udp_children = 65", "0"]),
    ("sip", "udp_children", '"two"', ["sip.udp_children", "integer"]),
    ("sip", "tls_certfile", '"/nonexistent/cert.pem"', ["sip.tls_certfile", "existing"]),
    ("rpc", "http_address", '"localhost"', ['rpc.http_address = "localhost"', "host:port"]),
    ("rpc", "http_address", '"127.0.0.1:99999"', ["rpc.http_address", "host:port"]),
    ("rpc", "unix_socket", '"' + "x" * 200 + '"', ["rpc.unix_socket", "107 bytes"]),
    ("log", "level", '"LOUD"', ['log.level = "LOUD"', "DEBUG, INFO"]),
    ("dmq", "dns_server", '"dns.example.com:53"', ["dmq.dns_server", "IP address"]),
    ("dmq", "dns_server", '"::1"', ["dmq.dns_server", "IP[:port]", "brackets"]),
    ("dmq", "dns_server", '"127.0.0.1:0"', ["dmq.dns_server", "from 1 to 65535"]),
    ("dmq", "dns_server", "53", ["dmq.dns_server", "string"]),
]


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    BAD_VALUES,
    ids=[f"{t}.{k}={v[:24]}" for t, k, v, _ in BAD_VALUES],
)
def test_bad_value_message(tmp_path: Path, table, key, value, expected):
    message = error_of(tmp_path, f"[{table}]\n{key} = {value}\n")
    assert f"{table}.{key}" in message
    for part in expected:
        assert part in message, (part, message)
    assert "pydmq.toml" in message  # where it came from


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        (
            "PYDMQ_DMQ_PING_INTERVAL",
            "-3",
            "dmq.ping_interval = -3: must be an integer from 1 to 86400",
        ),
        ("PYDMQ_DMQ_PING_INTERVAL", "soon", 'dmq.ping_interval = "soon"'),
        ("PYDMQ_DMQ_MULTI_NOTIFY", "yes", 'dmq.multi_notify = "yes"'),
        ("PYDMQ_TM_T1", "fast", 'tm.t1 = "fast"'),
        ("PYDMQ_TM_T1", "nan", "tm.t1 = nan"),
        ("PYDMQ_DMQ_ALLOWED_SOURCES", "10.0.0.0/8,bogus", 'item "bogus"'),
    ],
)
def test_bad_env_value_message(var, value, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(None, {var: value}, [])
    assert expected in str(info.value)
    assert f"environment {var}" in str(info.value)


@pytest.mark.parametrize(
    "address",
    [
        "sip:10.0.0.20:5060",
        "sip:10.0.0.20:5061;transport=tls",
        "sip:10.0.0.20:5060;transport=TCP",
        "sips:dmq.example.com:5061",
        "SIP:[2001:db8::1]:5060",
        "sip:dmq@10.0.0.20:5060",
    ],
)
def test_good_server_addresses(tmp_path: Path, address):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    settings, _ = settings_from_mapping(
        {"dmq": {"server_address": address}, "sip": {"tls_certfile": str(cert)}}
    )
    assert settings.dmq.server_address == address


@pytest.mark.parametrize("socket", ["udp:10.0.0.20:5060", "tcp:[::1]:5060", "tls:host.example"])
def test_good_server_sockets(tmp_path: Path, socket):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    data = {"dmq": {"server_socket": socket}, "sip": {"tls_certfile": str(cert)}}
    assert settings_from_mapping(data)[0].dmq.server_socket == socket


# ---- booleans ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
def test_booleans_in_toml(tmp_path: Path, value, expected):
    assert (
        load_toml(tmp_path, f"[dmq]\nfail_count_enabled = {value}\n")[0].dmq.fail_count_enabled
        is expected
    )


@pytest.mark.parametrize(
    ("value", "expected"), [("TRUE", True), ("False", False), ("1", True), ("0", False)]
)
def test_booleans_in_env(value, expected):
    settings, _ = load_settings(None, {"PYDMQ_SIP_TLS_VERIFY_CLIENT": value}, [])
    assert settings.sip.tls_verify_client is expected


# ---- ping_interval -----------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [1, 4, 5, 59])
def test_ping_interval_below_60_warns(tmp_path: Path, caplog, interval):
    with caplog.at_level(logging.WARNING, logger="pydmq.config"):
        settings, warnings = load_toml(tmp_path, f"[dmq]\nping_interval = {interval}\n")
    assert settings.dmq.ping_interval == interval
    assert len(warnings) == 1
    assert f"dmq.ping_interval = {interval}" in warnings[0]
    assert "minimum of 60" in warnings[0]
    assert warnings[0] in caplog.messages


@pytest.mark.parametrize("interval", [60, 61, 86400])
def test_ping_interval_from_60_does_not_warn(tmp_path: Path, interval):
    assert load_toml(tmp_path, f"[dmq]\nping_interval = {interval}\n")[1] == []


def test_ping_interval_zero_rejected():
    with pytest.raises(
        ConfigError, match=r"dmq\.ping_interval = 0: must be an integer from 1 to 86400"
    ):
        load_settings(None, {}, ["dmq.ping_interval=0"])


# ---- rules between parameters ------------------------------------------------------------------


def test_multi_notify_with_two_addresses_is_an_error(tmp_path: Path):
    message = error_of(
        tmp_path,
        "[dmq]\nmulti_notify = 1\n"
        'notification_address = ["sip:10.0.0.1:5060", "sip:10.0.0.2:5060"]\n',
    )
    assert "dmq.multi_notify" in message
    assert "notification_address" in message
    assert "not support" in message


def test_multi_notify_with_one_address_is_fine(tmp_path: Path):
    settings, warnings = load_toml(
        tmp_path, '[dmq]\nmulti_notify = true\nnotification_address = "sip:dmq.example.com"\n'
    )
    assert settings.dmq.multi_notify is True
    assert warnings == []  # no port is fine when SRV supplies it


@pytest.mark.parametrize("text", ["127.0.0.1:5353", "10.0.0.53", "[::1]:5353", "[2001:db8::53]"])
def test_dns_server_for_multi_notify(tmp_path: Path, text):
    settings, warnings = load_toml(
        tmp_path,
        f'[dmq]\nmulti_notify = 1\nnotification_address = "sip:dmq.test"\ndns_server = "{text}"\n',
    )
    assert settings.dmq.dns_server == text
    assert warnings == []
    assert Settings().dmq.dns_server is None  # default: the system resolver


def test_dns_server_without_multi_notify_warns(tmp_path: Path):
    settings, warnings = load_toml(tmp_path, '[dmq]\ndns_server = "127.0.0.1:5353"\n')
    assert settings.dmq.dns_server == "127.0.0.1:5353"
    assert len(warnings) == 1
    assert "dmq.dns_server" in warnings[0] and "multi_notify = 0" in warnings[0]
    empty, _ = load_toml(tmp_path, '[dmq]\ndns_server = ""\n')
    assert empty.dmq.dns_server is None


def test_notification_address_without_port_warns(tmp_path: Path):
    _, warnings = load_toml(tmp_path, '[dmq]\nnotification_address = "sip:10.0.0.1"\n')
    assert len(warnings) == 1
    assert "no port" in warnings[0]


def test_duplicate_notification_address_warns():
    _, warnings = settings_from_mapping(
        {"dmq": {"notification_address": ["sip:10.0.0.1:5060", "sip:10.0.0.1:5060"]}}
    )
    assert any("twice" in w for w in warnings)


def test_notification_address_outside_allowed_sources_warns():
    _, warnings = settings_from_mapping(
        {"dmq": {"notification_address": "sip:10.0.0.1:5060", "allowed_sources": "192.168.0.0/16"}}
    )
    assert any("allowed_sources" in w for w in warnings)


def test_t2_below_t1_is_an_error():
    with pytest.raises(ConfigError, match=r"tm\.t2 = 0\.25: must be at least tm\.t1"):
        settings_from_mapping({"tm": {"t2": 0.25}})


def test_tls_needs_a_certificate(tmp_path: Path):
    message = error_of(tmp_path, '[dmq]\nserver_address = "sips:10.0.0.1:5061"\n')
    assert "sip.tls_certfile" in message
    assert 'dmq.server_address = "sips:10.0.0.1:5061"' in message
    message = error_of(tmp_path, '[dmq]\nserver_socket = "tls:10.0.0.1:5061"\n')
    assert "sip.tls_certfile" in message
    assert 'dmq.server_socket = "tls:10.0.0.1:5061"' in message


def test_keyfile_without_certfile_is_an_error(tmp_path: Path):
    key = tmp_path / "key.pem"
    key.write_text("x")
    assert "sip.tls_certfile" in error_of(tmp_path, f'[sip]\ntls_keyfile = "{key}"\n')


# ---- the file itself ---------------------------------------------------------------------------


def test_toml_syntax_error_names_the_line(tmp_path: Path):
    message = error_of(tmp_path, "[dmq]\nping_interval = 90\nserver_address sip:x\n")
    assert "not valid TOML" in message
    assert "line 3" in message
    assert "pydmq.toml" in message


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml"):
        load_settings(str(tmp_path / "missing.toml"), {}, [])


# ---- [usrloc] ------------------------------------------------------------------------------------


def test_usrloc_table(tmp_path: Path):
    u = Settings().usrloc
    assert u == UsrlocSettings()
    # dmq_usrloc's documented defaults (usrloc: timer_interval 60, use_domain 0)
    assert (u.enable, u.sync, u.usrloc_domain, u.usrloc_delete) == (False, True, "location", True)
    assert (u.batch_msg_contacts, u.batch_msg_size, u.replicate_socket_info) == (1, 60000, False)
    assert (u.timer_interval, u.use_domain, u.sync_in_flight) == (60, False, 8)
    settings, warnings = load_toml(
        tmp_path,
        "[usrloc]\nenable = true\nsync = 0\nbatch_msg_contacts = 150\nbatch_msg_size = 1000\n"
        'usrloc_domain = "loc2"\nsync_in_flight = 2\ntimer_interval = 5\nuse_domain = 1\n'
        "usrloc_delete = false\nreplicate_socket_info = true\n",
        environ={"PYDMQ_USRLOC_BATCH_MSG_CONTACTS": "20"},
    )
    assert warnings == []
    assert settings.usrloc == UsrlocSettings(
        enable=True,
        sync=False,
        usrloc_domain="loc2",
        usrloc_delete=False,
        replicate_socket_info=True,
        batch_msg_contacts=20,
        batch_msg_size=1000,
        sync_in_flight=2,
        timer_interval=5,
        use_domain=True,
    )
    assert settings.to_dict()["usrloc"]["batch_msg_contacts"] == 20
    for bad, words in [
        ("batch_msg_contacts = 151", ["usrloc.batch_msg_contacts", "1 to 150"]),
        ("batch_msg_size = 60001", ["usrloc.batch_msg_size", "1 to 60000"]),
        ("sync_in_flight = 0", ["usrloc.sync_in_flight"]),
        ('usrloc_domain = "a b"', ["usrloc.usrloc_domain", "table name"]),
        ("enable = 2", ["usrloc.enable", "boolean"]),
        ("batch_size = 10", ["usrloc.batch_size", "[usrloc] accepts"]),
    ]:
        message = error_of(tmp_path, f"[usrloc]\n{bad}\n")
        assert all(w in message for w in words), (bad, message)


# ---- [htable] ------------------------------------------------------------------------------------


def test_htable_table(tmp_path: Path):
    h = Settings().htable
    assert h == HtableSettings()
    # htable's documented defaults: no tables, enable_dmq 0, dmq_init_sync 0, timer_interval 20
    assert (h.tables, h.enable_dmq, h.dmq_init_sync, h.timer_interval) == ((), False, False, 20)
    assert (h.sync_window, h.sync_group_bytes, h.sync_group_bytes_udp, h.sync_retries) == (
        4,
        15000,
        1000,
        2,
    )
    settings, warnings = load_toml(
        tmp_path,
        "[htable]\n"
        'tables = ["t=>size=8;autoexpire=0;dmqreplicate=1;", " a => autoexpire=3600;initval=-1"]\n'
        "enable_dmq = 1\ndmq_init_sync = true\ntimer_interval = 5\nsync_window = 8\n"
        "sync_group_bytes = 60000\nsync_group_bytes_udp = 1400\nsync_retries = 0\n",
        environ={"PYDMQ_HTABLE_SYNC_WINDOW": "2"},
    )
    assert warnings == []
    h = settings.htable
    assert h.tables == ("t=>size=8;autoexpire=0;dmqreplicate=1;", "a => autoexpire=3600;initval=-1")
    assert h.specs == (
        HtableSpec("t", size=8, dmqreplicate=True),
        HtableSpec("a", autoexpire=3600, initval=-1),
    )
    assert (h.enable_dmq, h.dmq_init_sync, h.timer_interval, h.sync_window) == (True, True, 5, 2)
    assert (h.sync_group_bytes, h.sync_group_bytes_udp, h.sync_retries) == (60000, 1400, 0)
    d = settings.to_dict()
    json.dumps(d)
    assert d["htable"]["tables"] == list(h.tables)
    # a comma-separated environment list; a bare string is a list of one
    settings, _ = load_toml(tmp_path, '[htable]\ntables = "x=>size=2"\n', environ={}, overrides=[])
    assert settings.htable.tables == ("x=>size=2",)
    settings, _ = load_settings(None, {"PYDMQ_HTABLE_TABLES": "a=>size=4,b=>size=5"}, [])
    assert [s.name for s in settings.htable.specs] == ["a", "b"]


def test_htable_spec_syntax():
    assert parse_htable_spec("t=>size=8;autoexpire=0;dmqreplicate=1") == HtableSpec(
        "t", size=8, dmqreplicate=True
    )
    spec = parse_htable_spec("c=>size=4;autoexpire=7200;initval=1;updateexpire=0;")
    assert spec == HtableSpec("c", 4, 7200, updateexpire=False, initval=1)
    assert parse_htable_spec("b=>").size == 4
    # Kamailio's slot count: 2**size, size <= 1 -> 8 slots, size > 31 -> 2**14
    assert [parse_htable_spec(f"t=>size={n}").slots for n in (0, 1, 2, 8, 32)] == [
        8,
        8,
        4,
        256,
        16384,
    ]
    for bad, words in [
        ("t", "name=>"),
        ("=>size=4", "table name"),
        ("t=>size=x", "size"),
        ("t=>size=-1", "non-negative"),
        ("t=>autoexpire", "autoexpire"),
        ("t=>expire=5", "unknown attribute 'expire'"),
        ("t=>dbtable=x", "no database"),
        ("t=>size=4;size=5", "twice"),
        ("t=>dmqreplicate=2", "0 or 1"),
        ("t=>initval=99999999999", "initval"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_htable_spec(bad)
        assert words in str(info.value), (bad, info.value)


def test_htable_errors_and_warnings(tmp_path: Path):
    message = error_of(tmp_path, '[htable]\ntables = ["t=>size=8;autoexpir=1"]\n')
    assert "htable.tables" in message and "did you mean autoexpire" in message
    message = error_of(tmp_path, '[htable]\ntables = ["t=>size=8", "t=>size=4"]\n')
    assert "twice" in message
    for bad, words in [
        ("sync_window = 0", ["htable.sync_window", "1 to 64"]),
        ("sync_group_bytes = 70000", ["htable.sync_group_bytes", "1024 to 60000"]),
        ("sync_group_bytes_udp = 100", ["htable.sync_group_bytes_udp"]),
        ("timer_interval = 0", ["htable.timer_interval"]),
        ("htable = []", ["htable.htable", "[htable] accepts"]),
    ]:
        message = error_of(tmp_path, f"[htable]\n{bad}\n")
        assert all(w in message for w in words), (bad, message)
    _settings, warnings = load_toml(
        tmp_path, '[htable]\ntables = ["t=>dmqreplicate=1"]\ndmq_init_sync = 1\n'
    )
    assert len(warnings) == 2
    assert "dmqreplicate=1 but htable.enable_dmq = 0" in warnings[0]
    assert "dmq_init_sync" in warnings[1]


# ---- [script] ------------------------------------------------------------------------------------


def test_script_table(tmp_path: Path):
    assert Settings().script.path is None  # no script: the default route
    route = tmp_path / "route.py"
    route.write_text("def request_route(msg):\n    msg.reply(200, 'OK')\n")
    settings, warnings = load_toml(tmp_path, f'[script]\npath = "{route}"\n')
    assert (settings.script.path, warnings) == (str(route), [])
    assert settings.to_dict()["script"] == {"path": str(route)}
    # environment and --set, as for every table; an empty string means "no script"
    settings, _ = load_settings(None, {"PYDMQ_SCRIPT_PATH": str(route)}, [])
    assert settings.script.path == str(route)
    settings, _ = load_toml(tmp_path, f'[script]\npath = "{route}"\n', overrides=["script.path="])
    assert settings.script.path is None
    message = error_of(tmp_path, f'[script]\npath = "{tmp_path / "missing.py"}"\n')
    assert "script.path" in message and "existing" in message
    message = error_of(tmp_path, '[script]\nfile = "route.py"\n')
    assert "script.file" in message
