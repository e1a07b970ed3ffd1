"""Peers (channels): registration, lookup, auto-registration and running callbacks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest

from pydmq.dmq.peer import (
    Peer,
    PeerError,
    PeerRegistry,
    PeerResponse,
    run_callback,
    run_init_callbacks,
)


@dataclass
class FakeRequest:
    """Stand-in for pydmq.sip.message.Request: peers only pass it through."""

    ruri_user: str
    body: bytes = b""


@dataclass
class FakeNode:
    """Stand-in for pydmq.dmq.node.Node."""

    host: str
    port: int = 5060


def ok_callback(request, node):
    return PeerResponse(200, "OK")


# --- PeerResponse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "sendable"),
    [(200, "OK", True), (0, "OK", False), (-1, "OK", False), (200, "", False), (0, "", False)],
)
def test_response_is_sendable_only_with_code_and_reason(code, reason, sendable):
    assert PeerResponse(code, reason).is_sendable is sendable


def test_response_defaults():
    response = PeerResponse(200, "OK")
    assert response.body == b""
    assert response.content_type is None
    assert not hasattr(response, "__dict__")  # slots


# --- registry ---------------------------------------------------------------------------------


def test_register_returns_peer_and_get_finds_it():
    registry = PeerRegistry()
    peer = registry.register("htable", "htable replication", ok_callback)
    assert isinstance(peer, Peer)
    assert (peer.peer_id, peer.description, peer.callback) == (
        "htable",
        "htable replication",
        ok_callback,
    )
    assert peer.init_callback is None
    assert registry.get("htable") is peer
    assert "htable" in registry
    assert len(registry) == 1


def test_register_duplicate_raises_and_keeps_first():
    registry = PeerRegistry()
    first = registry.register("usrloc", "first", ok_callback)
    with pytest.raises(PeerError, match=r"usrloc.*already registered"):
        registry.register("usrloc", "second", ok_callback)
    assert registry.get("usrloc") is first
    assert len(registry) == 1


def test_register_empty_id_raises():
    with pytest.raises(PeerError):
        PeerRegistry().register("", "nothing", ok_callback)


def test_lookup_is_exact_and_case_sensitive():
    registry = PeerRegistry()
    registry.register("notification_peer", "", ok_callback)
    assert registry.get("notification_peer") is not None
    for other in ("Notification_peer", "NOTIFICATION_PEER", "notification_peer ", "notification"):
        assert registry.get(other) is None
        assert other not in registry


def test_case_variants_are_distinct_peers():
    registry = PeerRegistry()
    lower = registry.register("dialog", "", ok_callback)
    upper = registry.register("Dialog", "", ok_callback)
    assert registry.get("dialog") is lower
    assert registry.get("Dialog") is upper


def test_iteration_is_most_recent_first():
    registry = PeerRegistry()
    for name in ("notification_peer", "htable", "usrloc", "dialog"):
        registry.register(name, "", ok_callback)
    assert [p.peer_id for p in registry] == ["dialog", "usrloc", "htable", "notification_peer"]


# --- auto-registration ------------------------------------------------------------------------


async def test_auto_registered_channel_answers_202_accepted_dmq():
    registry = PeerRegistry()
    peer = registry.register_auto("custom")
    assert registry.get("custom") is peer
    response = await run_callback(peer, FakeRequest("custom"), None)
    assert (response.code, response.reason, response.body) == (202, "Accepted DMQ", b"")
    assert response.is_sendable


def test_register_auto_returns_existing_peer_unchanged():
    registry = PeerRegistry()
    existing = registry.register("htable", "htable", ok_callback)
    assert registry.register_auto("htable") is existing
    assert registry.register_auto("custom") is registry.register_auto("custom")
    assert len(registry) == 2


# --- running callbacks ------------------------------------------------------------------------


async def test_sync_callback_gets_request_and_node():
    seen = []

    def callback(request, node):
        seen.append((request, node))
        return PeerResponse(200, "OK", b"sip:1.2.3.4:5060;status=active\r\n", "text/plain")

    peer = PeerRegistry().register("notification_peer", "", callback)
    request, node = FakeRequest("notification_peer"), FakeNode("1.2.3.4")
    response = await run_callback(peer, request, node)
    assert seen == [(request, node)]
    assert response == PeerResponse(200, "OK", b"sip:1.2.3.4:5060;status=active\r\n", "text/plain")


async def test_async_callback_is_awaited_and_node_may_be_none():
    seen = []

    async def callback(request, node):
        await asyncio.sleep(0)
        seen.append(node)
        return PeerResponse(400, "Bad Request")

    peer = PeerRegistry().register("htable", "", callback)
    response = await run_callback(peer, FakeRequest("htable"), None)
    assert seen == [None]
    assert (response.code, response.reason) == (400, "Bad Request")


async def test_unsendable_response_is_passed_through():
    peer = PeerRegistry().register("quiet", "", lambda request, node: PeerResponse(0, ""))
    response = await run_callback(peer, FakeRequest("quiet"), None)
    assert not response.is_sendable


@pytest.mark.parametrize("is_async", [False, True])
async def test_callback_exception_gives_500_and_is_logged_once(caplog, is_async):
    def boom_sync(request, node):
        raise KeyError("missing field")

    async def boom_async(request, node):
        await asyncio.sleep(0)
        raise KeyError("missing field")

    peer = PeerRegistry().register("broken", "", boom_async if is_async else boom_sync)
    with caplog.at_level(logging.DEBUG, logger="pydmq"):
        response = await run_callback(peer, FakeRequest("broken"), None)
    assert (response.code, response.reason) == (500, "Server Internal Error")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "'broken'" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], KeyError)


async def test_callback_returning_wrong_type_gives_500(caplog):
    peer = PeerRegistry().register("sloppy", "", lambda request, node: None)
    with caplog.at_level(logging.ERROR, logger="pydmq"):
        response = await run_callback(peer, FakeRequest("sloppy"), None)
    assert response.code == 500
    assert len([r for r in caplog.records if "sloppy" in r.getMessage()]) == 1


async def test_callback_cancellation_propagates():
    started = asyncio.Event()

    async def hang(request, node):
        started.set()
        await asyncio.Event().wait()

    peer = PeerRegistry().register("hang", "", hang)
    task = asyncio.create_task(run_callback(peer, FakeRequest("hang"), None))
    await asyncio.wait_for(started.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)


# --- init callbacks ---------------------------------------------------------------------------


async def test_init_callbacks_run_in_list_order_and_survive_failures(caplog):
    order = []

    async def async_init():
        await asyncio.sleep(0)
        order.append("dialog")

    def failing_init():
        order.append("usrloc")
        raise RuntimeError("cannot sync")

    registry = PeerRegistry()
    registry.register("notification_peer", "", ok_callback)  # no init callback
    registry.register("htable", "", ok_callback, lambda: order.append("htable"))
    registry.register("usrloc", "", ok_callback, failing_init)
    registry.register("dialog", "", ok_callback, async_init)
    with caplog.at_level(logging.ERROR, logger="pydmq"):
        ran = await run_init_callbacks(registry)
    assert order == ["dialog", "usrloc", "htable"]
    assert ran == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "'usrloc'" in errors[0].getMessage()
