"""The libvirt driver against libvirt's test driver (a fresh node file per test)."""
from __future__ import annotations

import threading

import libvirt
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.threadable import isInIOThread

from kvmdesk.agent import hypervisor as hv
from kvmdesk.agent.hypervisor import (
    DomainNotFound,
    DomainStateError,
    HypervisorError,
    HypervisorUnavailable,
    InvalidDomainXML,
)
from kvmdesk.agent.testdriver import DomainSpec, domain_xml, write_test_host

#: Bound for the blocking waits inside pool threads (never reached when the code works).
TIMEOUT = 10.0


def _states(domains: list[dict]) -> dict[str, str]:
    return {d["name"]: d["state"] for d in domains}


def _next_delay(clock) -> float:
    (call,) = clock.getDelayedCalls()
    return call.getTime() - clock.seconds()


# -- domain lifecycle --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_define_start_destroy_undefine(host_uri, start_hypervisor):
    service = await start_hypervisor(host_uri)
    assert await service.list_domains() == []

    defined = await service.define(domain_xml("desk-1", vcpus=2, memory_kib=262144))
    assert defined["name"] == "desk-1"
    assert defined["state"] == "shutoff"
    assert defined["id"] is None
    assert (defined["vcpus"], defined["max_memory_kib"], defined["persistent"]) == (2, 262144, True)

    started = await service.start("desk-1")
    assert started["state"] == "running"
    assert started["id"] is not None
    # Lookups work by UUID as well as by name.
    assert (await service.domain_info(defined["uuid"]))["state"] == "running"

    assert (await service.destroy(defined["uuid"]))["state"] == "shutoff"
    assert _states(await service.list_domains()) == {"desk-1": "shutoff"}

    assert await service.undefine("desk-1") == {"uuid": defined["uuid"], "name": "desk-1"}
    assert await service.list_domains() == []
    with pytest.raises(DomainNotFound):
        await service.domain_info("desk-1")


@pytest_twisted.ensureDeferred
async def test_preloaded_domains_shutdown_reboot(tmp_path, start_hypervisor):
    uri = write_test_host(
        tmp_path / "node.xml",
        domains=[
            DomainSpec("web", vcpus=2, memory_kib=1048576, state="running"),
            {"name": "idle", "state": "shutoff"},
            {"name": "held", "state": "paused"},
        ],
    )
    service = await start_hypervisor(uri)
    domains = await service.list_domains()
    assert _states(domains) == {"held": "paused", "idle": "shutoff", "web": "running"}
    assert [d["name"] for d in domains] == ["held", "idle", "web"]
    web = next(d for d in domains if d["name"] == "web")
    assert (web["vcpus"], web["memory_kib"]) == (2, 1048576)

    assert (await service.reboot("web"))["state"] == "running"
    # The test driver's guests obey at once; a real guest stops later, reported by an event.
    assert (await service.shutdown("web"))["state"] == "shutoff"


@pytest_twisted.ensureDeferred
async def test_domain_xml_and_node_info(tmp_path, start_hypervisor):
    uri = write_test_host(tmp_path / "n.xml", hostname="node-b", cpus=8, memory_kib=16 * 1024 * 1024)
    service = await start_hypervisor(uri)
    await service.define(domain_xml("desk-x", uuid="0a7e4c7c-1a8c-4a35-9c7b-5d1f7d0c2e11"))
    xml = await service.domain_xml("desk-x", inactive=True)
    assert "<name>desk-x</name>" in xml
    assert "0a7e4c7c-1a8c-4a35-9c7b-5d1f7d0c2e11" in xml

    info = await service.node_info()
    assert info["hostname"] == "node-b"
    assert (info["cpus"], info["memory_kib"]) == (8, 16 * 1024 * 1024)
    assert info["demo"] is True
    assert info["uri"] == uri


@pytest_twisted.ensureDeferred
async def test_errors_are_mapped(host_uri, start_hypervisor):
    service = await start_hypervisor(host_uri)
    with pytest.raises(DomainNotFound) as missing:
        await service.start("no-such-domain")
    assert missing.value.code == libvirt.VIR_ERR_NO_DOMAIN
    assert "no-such-domain" in missing.value.message or "not found" in missing.value.message.lower()

    await service.define(domain_xml("desk-2"))
    with pytest.raises(DomainStateError) as stopped:
        await service.destroy("desk-2")
    assert "not running" in stopped.value.message
    await service.start("desk-2")
    # The test driver reports this one as an internal error (QEMU says "operation invalid"): it
    # still arrives as a HypervisorError with libvirt's message.
    with pytest.raises(HypervisorError) as running:
        await service.start("desk-2")
    assert "already running" in running.value.message

    with pytest.raises(InvalidDomainXML) as bad:
        await service.define("<domain type='test'><name>broken</name></domain>")
    assert "os" in bad.value.message
    # All of them are HypervisorErrors, so an API layer can catch one type.
    assert issubclass(InvalidDomainXML, HypervisorError) and issubclass(DomainNotFound, HypervisorError)


@pytest_twisted.ensureDeferred
async def test_calls_run_in_the_pool_not_the_reactor_thread(host_uri, start_hypervisor):
    service = await start_hypervisor(host_uri)
    caller = await service.run(lambda conn: threading.current_thread())
    assert caller is not threading.main_thread()
    assert caller.name.startswith("PoolThread-libvirt ")


def test_names_of_states_events_and_details():
    assert hv.state_name(libvirt.VIR_DOMAIN_SHUTOFF) == "shutoff"
    assert hv.event_name(libvirt.VIR_DOMAIN_EVENT_STOPPED) == "stopped"
    assert hv.event_detail_name(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED) == "destroyed"
    assert hv.event_detail_name(libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED) == "booted"
    assert hv.event_detail_name(libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED) == "finished"
    assert hv.state_name(99) == "unknown(99)"


def test_connection_errors_are_recognised(libvirt_error):
    rpc = libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "End of file while reading data")
    qemu = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, "qemu unexpectedly closed")
    assert hv.is_connection_error(rpc)
    assert not hv.is_connection_error(qemu)
    assert isinstance(hv.map_error(rpc), HypervisorUnavailable)
    assert type(hv.map_error(qemu)) is HypervisorError
    assert hv.map_error(qemu).message == "qemu unexpectedly closed"


# -- events ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lifecycle_events_reach_the_subscriber_on_the_reactor_thread(host_uri, start_hypervisor, bounded):
    service = await start_hypervisor(host_uri)
    expected = [
        ("defined", "added"),
        ("started", "booted"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    received: list[dict] = []
    threads_ok: list[bool] = []
    all_arrived: Deferred[None] = Deferred()

    def subscriber(event: dict) -> None:
        threads_ok.append(isInIOThread())
        received.append(event)
        if len(received) == len(expected):
            all_arrived.callback(None)

    service.subscribe(subscriber)
    info = await service.define(domain_xml("desk-ev"))
    await service.start("desk-ev")
    await service.destroy("desk-ev")
    await service.undefine("desk-ev")
    await bounded(all_arrived)

    assert [(e["event"], e["detail"]) for e in received] == expected
    assert {(e["uuid"], e["name"]) for e in received} == {(info["uuid"], "desk-ev")}
    assert threads_ok == [True] * len(expected)


@pytest_twisted.ensureDeferred
async def test_a_failing_subscriber_is_logged_and_does_not_stop_the_others(host_uri, start_hypervisor, bounded):
    service = await start_hypervisor(host_uri)
    logged: list[dict] = []
    observer = lambda event: logged.append(event) if event.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        first: Deferred[dict] = Deferred()
        second: Deferred[dict] = Deferred()
        seen_by_removed: list[str] = []

        def broken(event: dict) -> None:
            raise RuntimeError("subscriber bug")

        def removed(event: dict) -> None:
            seen_by_removed.append(event["name"])
            first.called or first.callback(event)

        service.subscribe(broken)
        unsubscribe = service.subscribe(removed)
        await service.define(domain_xml("desk-one"))
        assert (await bounded(first))["event"] == "defined"

        unsubscribe()
        service.subscribe(lambda event: second.called or second.callback(event))
        await service.define(domain_xml("desk-two"))
        assert (await bounded(second))["name"] == "desk-two"
        # Subscribers are called in order within one delivery, so "removed" would have seen it.
        assert seen_by_removed == ["desk-one"]
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any(e["log_failure"].check(RuntimeError) for e in logged)


# -- reconnection ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnects_after_libvirt_closes_the_connection(host_uri, clock, start_hypervisor, bounded, counting_opener):
    opener = counting_opener()
    service = await start_hypervisor(host_uri, opener=opener)
    first = opener.opened[0]

    # libvirt calls the close callback on its event-loop thread when libvirtd goes away.
    await deferToThread(service._on_close, first, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert not service.connected
    with pytest.raises(HypervisorUnavailable):
        await service.list_domains()
    assert _next_delay(clock) == pytest.approx(1.0)

    clock.advance(1.0)
    await bounded(service.wait_connected())
    assert opener.attempts == 2
    assert opener.opened[1] is not first

    # The new connection delivers events again.
    got: Deferred[dict] = Deferred()
    service.subscribe(lambda event: got.called or got.callback(event))
    await service.define(domain_xml("after-reconnect"))
    assert (await bounded(got))["name"] == "after-reconnect"


@pytest_twisted.ensureDeferred
async def test_reconnect_backs_off_exponentially_and_resets(host_uri, clock, start_hypervisor, bounded, counting_opener):
    opener = counting_opener(failures=4)
    service = await start_hypervisor(host_uri, wait=False, opener=opener, initial_delay=1.0, max_delay=5.0)
    delays = []
    for _ in range(4):
        await bounded(service.idle())
        delay = _next_delay(clock)
        delays.append(delay)
        clock.advance(delay)
    await bounded(service.wait_connected())
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert opener.attempts == 5

    # After a success the backoff starts over.
    await deferToThread(service._on_close, opener.opened[-1], libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE, None)
    assert _next_delay(clock) == 1.0


@pytest_twisted.ensureDeferred
async def test_connection_error_during_a_call_triggers_a_reconnect(host_uri, clock, start_hypervisor, bounded, libvirt_error, counting_opener):
    opener = counting_opener()
    service = await start_hypervisor(host_uri, opener=opener)

    def not_found(conn):
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_DOMAIN, "Domain not found")

    with pytest.raises(DomainNotFound):
        await service.run(not_found)
    assert service.connected and clock.getDelayedCalls() == []

    def daemon_died(conn):
        raise libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "End of file while reading data")

    with pytest.raises(HypervisorUnavailable) as lost:
        await service.run(daemon_died)
    assert lost.value.message == "End of file while reading data"
    assert not service.connected
    clock.advance(_next_delay(clock))
    await bounded(service.wait_connected())
    assert opener.attempts == 2
    assert await service.list_domains() == []


@pytest_twisted.ensureDeferred
async def test_stop_cancels_a_pending_reconnect(host_uri, clock, start_hypervisor, bounded, counting_opener):
    opener = counting_opener(failures=100)
    service = await start_hypervisor(host_uri, wait=False, opener=opener)
    await bounded(service.idle())
    assert len(clock.getDelayedCalls()) == 1
    waiting = service.wait_connected()
    await bounded(service.stopService())
    assert clock.getDelayedCalls() == []
    with pytest.raises(HypervisorUnavailable):
        await waiting
    with pytest.raises(HypervisorUnavailable):
        await service.list_domains()
    with pytest.raises(HypervisorUnavailable):
        await service.wait_connected()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_calls_in_progress(host_uri, start_hypervisor, bounded):
    service = await start_hypervisor(host_uri)
    release = threading.Event()
    entered = threading.Event()

    def slow(conn):
        entered.set()
        # Bounded so that a broken test cannot hang the run.
        if not release.wait(TIMEOUT):
            raise RuntimeError("never released")
        return conn.getInfo()[0]

    call = service.run(slow)
    await deferToThread(entered.wait, TIMEOUT)
    stopping = service.stopService()
    assert not stopping.called
    assert not call.called
    release.set()
    assert await bounded(call) == "kvmdesk-test-cpu"
    await bounded(stopping)
    assert not service.running and not service.connected


@pytest_twisted.ensureDeferred
async def test_a_stopped_service_can_start_again(host_uri, start_hypervisor, bounded):
    service = await start_hypervisor(host_uri)
    await service.define(domain_xml("kept-in-file-only"))
    await bounded(service.stopService())
    assert not service.connected
    service.startService()
    await bounded(service.wait_connected())
    # A new connection reloads the node file: what was defined in memory before is gone.
    assert await service.list_domains() == []
