"""The agent's libvirt driver: domain lifecycle, lifecycle events and reconnection.

- Every libvirt call runs in the service's own thread pool and comes back as a Deferred: libvirt
  calls block (RPC to libvirtd, sometimes for seconds) and must never run on the reactor thread.
- Lifecycle events come from libvirt's default event loop, run on one daemon thread per process
  (libvirt allows a single event implementation per process, shared by every connection).  The
  callback only copies the event into a dict and hands it to the reactor with ``callFromThread``.
- When libvirtd goes away (close callback, or a call failing with a connection error) the service
  drops the connection and reconnects with exponential backoff on an injected clock.
"""
from __future__ import annotations

import threading
import uuid as uuidlib
from typing import Any, Callable, TypeVar

import attrs
import libvirt
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kvmdesk.core.threadpools import stop_pool

from .testdriver import node_file_of, read_test_hostname

T = TypeVar("T")
Event = dict[str, str]
Subscriber = Callable[[Event], Any]

log = Logger()


# -- errors ------------------------------------------------------------------------------------------


class HypervisorError(Exception):
    """A libvirt operation failed.

    :param message: libvirt's message (or ours when the call never reached libvirt).
    :param code: libvirt's ``virErrorNumber``, ``None`` when not from libvirt.
    """

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class DomainNotFound(HypervisorError):
    """No domain with that name or UUID."""


class DomainStateError(HypervisorError):
    """The operation is not valid in the domain's current state (e.g. starting a running domain)."""


class InvalidDomainXML(HypervisorError):
    """libvirt rejected a domain definition."""


class HypervisorUnavailable(HypervisorError):
    """Not connected to libvirt (service stopped, libvirtd down, reconnection pending)."""


class OperationUnsupported(HypervisorError):
    """This hypervisor driver cannot do that (the test driver cannot hot-plug media or send keys)."""


_CONNECTION_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}
# System and internal errors mean a lost connection only when they come from the RPC layer;
# from a driver (qemu, storage) they are ordinary operation failures.
_TRANSPORT_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
_TRANSPORT_DOMAINS = {libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC}
_XML_CODES = {libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL}
_UNSUPPORTED_FLAG_CODES = {libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT}


def is_connection_error(error: libvirt.libvirtError) -> bool:
    """Whether ``error`` means the connection to libvirtd is gone."""
    code = error.get_error_code()
    if code in _CONNECTION_CODES:
        return True
    return code in _TRANSPORT_CODES and error.get_error_domain() in _TRANSPORT_DOMAINS


def map_error(error: libvirt.libvirtError) -> HypervisorError:
    """The :class:`HypervisorError` subclass for a libvirt error, carrying libvirt's message."""
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    if is_connection_error(error):
        return HypervisorUnavailable(message, code)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message, code)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainStateError(message, code)
    if code in _XML_CODES:
        return InvalidDomainXML(message, code)
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return OperationUnsupported(message, code)
    return HypervisorError(message, code)


# -- names -------------------------------------------------------------------------------------------

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
}


def _detail_names() -> dict[int, dict[int, str]]:
    # Built from the binding's constants (VIR_DOMAIN_EVENT_STOPPED_DESTROYED, ...) so details
    # added by newer libvirt versions are named without touching this table.
    table: dict[int, dict[int, str]] = {}
    for event, name in EVENT_NAMES.items():
        prefix = f"VIR_DOMAIN_EVENT_{name.upper()}_"
        table[event] = {
            getattr(libvirt, attr): attr[len(prefix):].lower()
            for attr in dir(libvirt)
            if attr.startswith(prefix) and not attr.endswith("_LAST")
        }
    return table


_DETAIL_NAMES = _detail_names()


def state_name(state: int) -> str:
    """``running``, ``shutoff``, ... for a ``virDomainState`` number."""
    return STATE_NAMES.get(state, f"unknown({state})")


def event_name(event: int) -> str:
    """``started``, ``stopped``, ... for a ``virDomainEventType`` number."""
    return EVENT_NAMES.get(event, f"unknown({event})")


def event_detail_name(event: int, detail: int) -> str:
    """``booted``, ``destroyed``, ... for an event's detail number."""
    return _DETAIL_NAMES.get(event, {}).get(detail, f"unknown({detail})")


# -- the process-wide event loop ---------------------------------------------------------------------

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    # Every error reaches us as an exception that we map and log; libvirt's default handler would
    # also print it to stderr from whatever thread raised it.
    return None


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and start its thread, once per process.

    It must happen before any connection is opened, or that connection never delivers events.
    The thread is a daemon that lives as long as the process: libvirt offers no way to unregister
    the implementation, and every connection of the process shares it.
    """
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        if libvirt.virEventRegisterDefaultImpl() < 0:
            raise HypervisorError("cannot register libvirt's default event loop")
        thread = threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True)
        thread.start()
        _event_loop_thread = thread


# -- blocking helpers (run in the pool) --------------------------------------------------------------


def _lookup(conn: libvirt.virConnect, ident: str) -> libvirt.virDomain:
    try:
        uuidlib.UUID(ident)
    except ValueError:
        return conn.lookupByName(ident)
    return conn.lookupByUUIDString(ident)


def domain_info(dom: libvirt.virDomain) -> dict[str, Any]:
    """A domain's summary (blocking).

    :returns: ``{"uuid", "name", "id", "state", "vcpus", "memory_kib", "max_memory_kib",
        "persistent", "cpu_time_ns"}``; ``id`` is ``None`` while the domain is not running.
    """
    state, max_memory, memory, vcpus, cpu_time = dom.info()
    dom_id = dom.ID()
    return {
        "uuid": dom.UUIDString(),
        "name": dom.name(),
        "id": dom_id if dom_id >= 0 else None,
        "state": state_name(state),
        "vcpus": vcpus,
        "memory_kib": memory,
        "max_memory_kib": max_memory,
        "persistent": bool(dom.isPersistent()),
        "cpu_time_ns": cpu_time,
    }


def _list_domains(conn: libvirt.virConnect) -> list[dict[str, Any]]:
    result = []
    for dom in conn.listAllDomains(0):
        try:
            result.append(domain_info(dom))
        except libvirt.libvirtError as exc:
            # Undefined between the listing and the lookup: it is simply no longer there.
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    result.sort(key=lambda entry: entry["name"])
    return result


def _act(conn: libvirt.virConnect, ident: str, action: Callable[[libvirt.virDomain], Any]) -> dict:
    dom = _lookup(conn, ident)
    action(dom)
    return domain_info(dom)


#: Linux key codes of ctrl+alt+del (KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE).
CTRL_ALT_DEL = (29, 56, 111)


def _start(dom: libvirt.virDomain) -> None:
    # Drivers disagree on the error for a running domain (the test driver's is an "internal error"):
    # one clear answer whichever runs.
    if dom.isActive():
        raise DomainStateError(f"domain '{dom.name()}' is already running")
    dom.create()


def _hard_reboot(dom: libvirt.virDomain) -> None:
    if dom.isActive():
        dom.destroy()
    dom.create()


def _send_keys(dom: libvirt.virDomain, keys: tuple[int, ...]) -> None:
    dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, list(keys), len(keys), 0)


def _update_device(dom: libvirt.virDomain, device_xml: str) -> None:
    # The definition always changes; a running domain's device too (media change while it runs).
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.updateDeviceFlags(device_xml, flags)


def _secure_xml(conn: libvirt.virConnect, ident: str) -> tuple[bool, str]:
    """``(active, XML with secrets)``: the live definition while running, else the inactive one."""
    dom = _lookup(conn, ident)
    active = bool(dom.isActive())
    flags = libvirt.VIR_DOMAIN_XML_SECURE | (0 if active else libvirt.VIR_DOMAIN_XML_INACTIVE)
    return active, dom.XMLDesc(flags)


def _undefine_flag_sets(dom: libvirt.virDomain) -> list[int]:
    metadata = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    full = metadata | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    # QEMU refuses to undefine a UEFI domain unless told what to do with its NVRAM file.
    if "<nvram" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE):
        full |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    # Drivers reject flags they do not know (the test driver knows only the first two), so fall
    # back to less until one is accepted.
    return [full, metadata, 0]


def _undefine(conn: libvirt.virConnect, ident: str) -> dict[str, Any]:
    dom = _lookup(conn, ident)
    summary = {"uuid": dom.UUIDString(), "name": dom.name()}
    flag_sets = _undefine_flag_sets(dom)
    for flags in flag_sets:
        try:
            dom.undefineFlags(flags)
            return summary
        except libvirt.libvirtError as exc:
            if flags == flag_sets[-1] or exc.get_error_code() not in _UNSUPPORTED_FLAG_CODES:
                raise
    return summary  # unreachable: the last flag set either returns or raises


def _node_info(conn: libvirt.virConnect) -> dict[str, Any]:
    model, memory_mib, cpus, mhz, numa_nodes, sockets, cores, threads = conn.getInfo()
    uri = conn.getURI()
    node_file = node_file_of(uri)
    hostname = (read_test_hostname(node_file) if node_file else None) or conn.getHostname()
    driver = conn.getType()
    return {
        "hostname": hostname,
        "cpu_model": model,
        "cpus": cpus,
        "mhz": mhz,
        "memory_kib": memory_mib * 1024,
        "numa_nodes": numa_nodes,
        "sockets": sockets,
        "cores": cores,
        "threads": threads,
        "driver": driver,
        "libvirt_version": conn.getLibVersion(),
        "uri": uri,
        # The all-in-one setup falls back to the test driver; the UI must say so.
        "demo": driver.upper() == "TEST",
    }


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the service -------------------------------------------------------------------------------------


@attrs.define(eq=False, slots=False)
class Hypervisor(Service):
    """A libvirt connection as a Twisted service.

    :param uri: ``qemu:///system`` in production, ``test:///abs/path/host.xml`` in tests.
    :param clock: schedules reconnection attempts.
    :param reactor: runs the thread-pool results and the event hand-over (``callFromThread``).
    :param pool_size: threads for libvirt calls.
    :param initial_delay: first reconnection delay, in seconds; doubled (``factor``) per failure
        up to ``max_delay``, back to ``initial_delay`` after a success.
    :param opener: opens a connection (``libvirt.open``); tests wrap it to count or fail attempts.
    """

    uri: str
    clock: IReactorTime = attrs.field(factory=_default_reactor)
    reactor: IReactorThreads = attrs.field(factory=_default_reactor)
    pool_size: int = 4
    initial_delay: float = 1.0
    max_delay: float = 60.0
    factor: float = 2.0
    opener: Callable[[str], libvirt.virConnect] = libvirt.open
    name: str = "hypervisor"

    _pool: ThreadPool | None = attrs.field(default=None, init=False)
    _conn: libvirt.virConnect | None = attrs.field(default=None, init=False)
    _event_id: int | None = attrs.field(default=None, init=False)
    _delay: float = attrs.field(default=0.0, init=False)
    _reconnect_call: Any = attrs.field(default=None, init=False)
    _connecting: bool = attrs.field(default=False, init=False)
    _subscribers: list[Subscriber] = attrs.field(factory=list, init=False)
    _inflight: set[object] = attrs.field(factory=set, init=False)
    _idle_waiters: list[Deferred] = attrs.field(factory=list, init=False)
    _connected_waiters: list[Deferred] = attrs.field(factory=list, init=False)

    # -- service lifecycle --

    def startService(self) -> None:
        """Start the thread pool and open the connection in it (retrying with backoff)."""
        ensure_event_loop()
        super().startService()
        self._pool = ThreadPool(minthreads=0, maxthreads=self.pool_size, name=f"libvirt {self.uri}")
        self._pool.start()
        self._delay = self.initial_delay
        self._connect()

    def stopService(self) -> Deferred[None]:
        """Stop reconnecting, let calls in progress finish, close the connection, stop the pool."""
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        await self._drain()
        conn, event_id = self._conn, self._event_id
        self._conn = self._event_id = None
        if conn is not None:
            await self._track(self._in_pool(self._dispose, conn, event_id))
        for waiter in self._connected_waiters:
            waiter.errback(HypervisorUnavailable("the hypervisor service stopped"))
        self._connected_waiters.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            await stop_pool(self.reactor, pool, "libvirt-pool-stop")

    # -- connection --

    @property
    def connected(self) -> bool:
        """Whether a connection is open right now."""
        return self._conn is not None

    def wait_connected(self) -> Deferred[None]:
        """Fires once connected (at once if already); fails with :class:`HypervisorUnavailable`
        if the service is not running or stops first."""
        if self._conn is not None:
            return succeed(None)
        if not self.running:
            return fail(HypervisorUnavailable("the hypervisor service is not running"))
        waiter: Deferred[None] = Deferred()
        self._connected_waiters.append(waiter)
        return waiter

    def _open(self) -> tuple[libvirt.virConnect, int]:
        """Open and subscribe (blocking, in the pool)."""
        conn = self.opener(self.uri)
        try:
            try:
                # Keepalive turns a hung libvirtd into a close event instead of calls that hang.
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass  # local drivers (test, and some embedded ones) do not do keepalive
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            event_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except BaseException:
            conn.close()
            raise
        return conn, event_id

    @staticmethod
    def _dispose(conn: libvirt.virConnect, event_id: int | None) -> None:
        """Unsubscribe and close (blocking, in the pool).

        Each step is tried on its own: on a connection that is already dead every one of them
        fails, and the later ones still release what they can.
        """
        steps: list[Callable[[], Any]] = [conn.unregisterCloseCallback, conn.close]
        if event_id is not None:
            steps.insert(0, lambda: conn.domainEventDeregisterAny(event_id))
        for step in steps:
            try:
                step()
            except libvirt.libvirtError:
                pass

    def _connect(self) -> None:
        if self._connecting or self._pool is None:
            return
        self._connecting = True
        d = self._in_pool(self._open)
        d.addCallbacks(self._connected, self._connect_failed)
        self._track(d)

    def _connected(self, result: tuple[libvirt.virConnect, int]) -> None:
        self._connecting = False
        conn, event_id = result
        if not self.running:
            self._track(self._in_pool(self._dispose, conn, event_id))
            return
        self._conn, self._event_id = conn, event_id
        self._delay = self.initial_delay
        log.info("connected to libvirt at {uri}", uri=self.uri)
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = False
        message = failure.value.get_error_message() if failure.check(libvirt.libvirtError) else failure.getErrorMessage()
        log.warn("cannot connect to libvirt at {uri}: {message}", uri=self.uri, message=message)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self.running or self._reconnect_call is not None or self._connecting:
            return
        delay = self._delay
        self._delay = min(self._delay * self.factor, self.max_delay)
        log.info("reconnecting to libvirt at {uri} in {delay}s", uri=self.uri, delay=delay)
        self._reconnect_call = self.clock.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        self._connect()

    def _connection_lost(self, conn: libvirt.virConnect, why: str) -> None:
        """Drop ``conn`` (reactor thread) and start reconnecting; stale reports are ignored."""
        if conn is not self._conn:
            return
        log.warn("lost the libvirt connection to {uri}: {why}", uri=self.uri, why=why)
        event_id = self._event_id
        self._conn = self._event_id = None
        if self._pool is not None:
            self._track(self._in_pool(self._dispose, conn, event_id))
        self._schedule_reconnect()

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        """libvirt's close callback (event-loop thread)."""
        why = f"connection closed ({CLOSE_REASONS.get(reason, reason)})"
        self.reactor.callFromThread(self._connection_lost, conn, why)

    # -- events --

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(event)`` on the reactor thread for every domain lifecycle event.

        The event is ``{"uuid", "name", "event", "detail"}`` with names such as ``started`` /
        ``booted`` or ``stopped`` / ``destroyed``.  A subscriber may return a Deferred; its
        failures, like exceptions, are logged and do not reach other subscribers.

        :returns: a callable that unsubscribes.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        """libvirt's lifecycle callback (event-loop thread): copy, then leave the thread at once."""
        try:
            payload = {
                "uuid": dom.UUIDString(),
                "name": dom.name(),
                "event": event_name(event),
                "detail": event_detail_name(event, detail),
            }
        except Exception:
            log.failure("cannot read a lifecycle event from libvirt")
            return
        self.reactor.callFromThread(self._deliver, payload)

    def _deliver(self, event: Event) -> None:
        if not self.running:
            return
        for subscriber in list(self._subscribers):
            d = maybeDeferred(subscriber, dict(event))
            d.addErrback(lambda f, s=subscriber: log.failure("event subscriber {s!r} failed", f, s=s))

    # -- calls --

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def _track(self, d: Deferred[T]) -> Deferred[T]:
        # Added after the caller's own callbacks, so stopService sees a call as finished only once
        # whatever it triggered (a reconnection, a disposal) has been set in motion.
        token = object()
        self._inflight.add(token)

        def settled(result: Any) -> Any:
            self._inflight.discard(token)
            if not self._inflight:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(settled)

    def idle(self) -> Deferred[None]:
        """Fires when no libvirt work (call, connection attempt, close) is in progress.

        Work started by the callbacks of finishing work (a reconnection scheduled after a failed
        attempt, a connection disposed after an error) is waited for too.
        """
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        while self._inflight:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            await waiter

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(conn, *args)`` in the pool with the current connection.

        libvirt errors come back as :class:`HypervisorError` subclasses; a connection error also
        starts a reconnection.  Fails with :class:`HypervisorUnavailable` while disconnected.
        """
        conn = self._conn
        if not self.running or self._pool is None:
            return fail(HypervisorUnavailable("the hypervisor service is not running"))
        if conn is None:
            return fail(HypervisorUnavailable(f"not connected to libvirt at {self.uri}"))
        d = self._in_pool(fn, conn, *args)
        d.addErrback(self._translate, conn)
        return self._track(d)

    def _translate(self, failure: Failure, conn: libvirt.virConnect) -> Failure:
        if not failure.check(libvirt.libvirtError):
            return failure
        error = failure.value
        mapped = map_error(error)
        mapped.__cause__ = error
        if isinstance(mapped, HypervisorUnavailable):
            self._connection_lost(conn, mapped.message)
        return Failure(mapped)

    # -- operations --

    def node_info(self) -> Deferred[dict[str, Any]]:
        """The hypervisor's view of the node: ``{"hostname", "cpu_model", "cpus", "mhz",
        "memory_kib", "numa_nodes", "sockets", "cores", "threads", "driver", "libvirt_version",
        "uri", "demo"}`` (``demo`` is true on the test driver)."""
        return self.run(_node_info)

    def list_domains(self) -> Deferred[list[dict[str, Any]]]:
        """Every domain, active or not, sorted by name, as :func:`domain_info` dicts."""
        return self.run(_list_domains)

    def domain_info(self, ident: str) -> Deferred[dict[str, Any]]:
        """One domain by UUID or name, as a :func:`domain_info` dict."""
        return self.run(lambda conn: domain_info(_lookup(conn, ident)))

    def domain_xml(self, ident: str, inactive: bool = False) -> Deferred[str]:
        """A domain's XML: the live definition, or with ``inactive`` the one used at next boot."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self.run(lambda conn: _lookup(conn, ident).XMLDesc(flags))

    def define(self, xml: str) -> Deferred[dict[str, Any]]:
        """Define (or redefine) a persistent domain from XML; returns its summary."""
        return self.run(lambda conn: domain_info(conn.defineXML(xml)))

    def start(self, ident: str) -> Deferred[dict[str, Any]]:
        """Boot a defined domain."""
        return self.run(_act, ident, _start)

    def shutdown(self, ident: str) -> Deferred[dict[str, Any]]:
        """Ask the guest to shut down (ACPI or agent); the domain stops later, with an event."""
        return self.run(_act, ident, lambda dom: dom.shutdown())

    def destroy(self, ident: str) -> Deferred[dict[str, Any]]:
        """Power a domain off at once."""
        return self.run(_act, ident, lambda dom: dom.destroy())

    def reboot(self, ident: str) -> Deferred[dict[str, Any]]:
        """Ask the guest to reboot."""
        return self.run(_act, ident, lambda dom: dom.reboot(0))

    def hard_reboot(self, ident: str) -> Deferred[dict[str, Any]]:
        """Power off at once (if running) and boot again."""
        return self.run(_act, ident, _hard_reboot)

    def reset(self, ident: str) -> Deferred[dict[str, Any]]:
        """Press the reset button: the guest restarts without shutting down."""
        return self.run(_act, ident, lambda dom: dom.reset(0))

    def send_key(self, ident: str, keys: tuple[int, ...] = CTRL_ALT_DEL) -> Deferred[dict[str, Any]]:
        """Press ``keys`` together (Linux key codes; ctrl+alt+del by default)."""
        return self.run(_act, ident, lambda dom: _send_keys(dom, keys))

    def update_device(self, ident: str, device_xml: str) -> Deferred[dict[str, Any]]:
        """Change a device in the definition, and live when the domain runs (CD-ROM media)."""
        return self.run(_act, ident, lambda dom: _update_device(dom, device_xml))

    def secure_xml(self, ident: str) -> Deferred[tuple[bool, str]]:
        """``(active, XML including secrets such as the VNC password)``; agent-internal, never served whole."""
        return self.run(_secure_xml, ident)

    def undefine(self, ident: str) -> Deferred[dict[str, str]]:
        """Remove a domain's persistent definition with its managed-save image and snapshot and
        checkpoint metadata (and NVRAM for UEFI guests).  A running domain keeps running as a
        transient one until stopped.

        :returns: ``{"uuid", "name"}`` of the domain removed.
        """
        return self.run(_undefine, ident)
