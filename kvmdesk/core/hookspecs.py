"""The hooks a kvmdesk plugin can implement, grouped by lifecycle phase.

Hooks declare things and do no I/O.  Hooks that must be asynchronous return a Deferred or coroutine
(or ``None``); the core wraps every result with ``maybeDeferred``/``ensureDeferred`` and gathers them,
so such hooks are never ``firstresult``.  Implement a hook with :data:`kvmdesk.hookimpl`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Iterable, Mapping, Optional

from kvmdesk import hookspec

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from twisted.application.service import IService

    from kvmdesk.core.app import Core
    from kvmdesk.core.routing import RouterLike
    from kvmdesk.core.store import Index


# -- configuration phase --------------------------------------------------------------------------


@hookspec
def kvmdesk_config_defaults() -> Mapping[str, Any]:
    """Declare a plugin's configuration defaults.

    :returns: ``{section: {key: value}}``; the file and command line override them.
    Not firstresult: every plugin's defaults are merged.
    """


@hookspec(historic=True)
def kvmdesk_configure(core: "Core") -> None:
    """Called once the core (configuration, store, clock) exists, before routes and services.

    Historic: a plugin registered later is still called with the same core.

    :param core: the running :class:`~kvmdesk.core.app.Core`.
    """


@hookspec
def kvmdesk_store_indexes() -> Iterable["Index"]:
    """Declare the store indexes (unique ones included) a plugin's collections need.

    :returns: :class:`~kvmdesk.core.store.Index` objects; created at start-up. Not firstresult.
    """


# -- assembly phase --------------------------------------------------------------------------------


@hookspec
def kvmdesk_routes(router: "RouterLike", core: "Core") -> None:
    """Register the plugin's HTTP endpoints on the API router (``router.endpoint(...)``).

    :param router: the one :class:`~kvmdesk.api.router.Router` of the process (core types it as
        :class:`~kvmdesk.core.routing.RouterLike`).
    :param core: the running core, for handlers to close over.
    """


@hookspec
def kvmdesk_services(core: "Core") -> Iterable["IService"]:
    """Declare long-lived services (watchers, loops) to run under the controller's MultiService.

    :returns: services; started after the store is ready, stopped on shutdown. Not firstresult.
    """


# -- start-up phase ---------------------------------------------------------------------------------


@hookspec
def kvmdesk_startup(core: "Core") -> Optional[Awaitable[None]]:
    """Seed data or check state once the store is ready, before the API listens.

    Asynchronous: return a Deferred or coroutine (or ``None``). Not firstresult; all are awaited.
    """


@hookspec
def kvmdesk_reconcile(core: "Core") -> Optional[Awaitable[None]]:
    """Repair references to other plugins' resources once every plugin has started.

    Called at every start-up, after ``kvmdesk_startup`` and before the API listens.  A plugin that
    keeps references to another plugin's records (pool uuids, network uuids...) checks them here: a
    change made while it was blocked sent it no ``kvmdesk_deleted``, so it forgets what no longer
    exists.  Asynchronous; a failure is logged and start-up goes on. Not firstresult; all are awaited.
    """


# -- lifecycle: after a change ------------------------------------------------------------------------
# Every plugin that owns a resource kind calls Core.created/updated/deleted after a successful
# change; the records passed are copies without secrets (agent secrets, password hashes).  Before a
# delete, ``kvmdesk_usage`` can still refuse it; these hooks only report what has happened.


@hookspec
def kvmdesk_created(core: "Core", kind: str, record: Mapping[str, Any]) -> Optional[Awaitable[None]]:
    """A resource was created.

    :param kind: the resource kind (``resource_pool``, ``node``, ``vswitch``, ``data_network``,
        ``subnet``, ``base_image``, ``iso``, ``user_group``, ``user``, or a plugin's own kind).
    :param record: the stored record (a copy, without secrets).
    :returns: ``None`` or an awaitable; all are awaited, a failure is logged and does not undo
        the change. Not firstresult.
    """


@hookspec
def kvmdesk_updated(
    core: "Core", kind: str, record: Mapping[str, Any], changes: Mapping[str, Any]
) -> Optional[Awaitable[None]]:
    """A resource was changed.

    :param kind: the resource kind (as for ``kvmdesk_created``).
    :param record: the record after the change (a copy, without secrets).
    :param changes: the fields that were set, with their new values (secrets left out).
    :returns: ``None`` or an awaitable; all are awaited, a failure is logged. Not firstresult.
    """


@hookspec
def kvmdesk_deleted(core: "Core", kind: str, record: Mapping[str, Any]) -> Optional[Awaitable[None]]:
    """A resource was deleted: forget or clean up what refers to it.

    :param kind: the resource kind (as for ``kvmdesk_created``).
    :param record: the record as it was before the delete (a copy, without secrets).
    :returns: ``None`` or an awaitable; all are awaited, a failure is logged. Not firstresult.
    """


# -- monitoring --------------------------------------------------------------------------------------


@hookspec
def kvmdesk_node_metrics(core: "Core", node: Mapping[str, Any], sample: Mapping[str, Any]) -> None:
    """A node watcher received a heartbeat sample from a node's agent.

    Called on the reactor thread for every heartbeat: keep it cheap (the monitoring plugin appends to
    in-memory buffers and writes rollups later).

    :param node: the node record (without its agent secret; ``facts`` as last fetched).
    :param sample: ``{"at", "agent", "hypervisor", "metrics"}``: ``at`` is the controller clock's
        Unix time of the answer, ``metrics`` the agent's sample (see
        :meth:`kvmdesk.agent.metrics.MetricsSampler.sample`, without processes).
    """


@hookspec
def kvmdesk_alarm(core: "Core", alarm: Mapping[str, Any], event: str) -> Optional[Awaitable[None]]:
    """An alarm opened or closed (notify someone: a webhook, mail, a chat).

    :param alarm: the alarm record: ``uuid``, ``rule_uuid``, ``metric``, ``node_uuid``, ``node_name``,
        ``value``, ``threshold``, ``started_at``, ``ended_at``, ``duration`` (seconds, once closed),
        ``status`` (``open``/``closed``), ``message``.
    :param event: ``opened`` or ``closed``.
    :returns: ``None`` or an awaitable (awaited, failures logged, never blocking the alarm). Not firstresult.
    """


@hookspec
def kvmdesk_resource_counts(core: "Core") -> Optional[Awaitable[Mapping[str, int]]]:
    """Contribute counts to the dashboard statistics (``GET /index/get_resource_statistic/``).

    Keys a plugin may answer: ``sum_instance_cnt``, ``online_instance_cnt``, ``sum_terminal_cnt``,
    ``online_terminal_cnt``; the answers of every plugin are added up.  The monitoring plugin already
    counts every libvirt domain the nodes report as an instance: count only what is not one.

    :returns: a mapping (or an awaitable of one), or ``None``. Not firstresult.
    """


# -- domain extension points -------------------------------------------------------------------------


@hookspec
def kvmdesk_usage(core: "Core", kind: str, uuid: str) -> Optional[Awaitable[Optional[str]]]:
    """Say whether a resource is still in use, so deleting it must be refused.

    Plugins that reference another plugin's resources answer for them, e.g. the nodes plugin
    answers for ``kind="resource_pool"`` while a pool still has nodes.

    :param kind: the resource kind (``resource_pool``, ``node``, ``data_network``, ``base_image``...).
    :param uuid: the resource's uuid.
    :returns: a reason when in use (a :class:`~kvmdesk.core.errors.Resource` with the text in
        both languages, or a short string), else ``None``;
        may be asynchronous. Not firstresult: the first reason found is reported.
    """


@hookspec
def kvmdesk_node_status_changed(core: "Core", node: Mapping[str, Any], old: Optional[str], new: str) -> None:
    """A node watcher saw a node change status (``online``, ``warning``, ``offline``).

    :param node: the node record after the change (without its agent secret).
    :param old: the previous status, ``None`` on the first observation.
    :param new: the new status.
    """


@hookspec
def kvmdesk_node_removing(core: "Core", node: Mapping[str, Any]) -> Optional[Awaitable[Optional[list]]]:
    """A node is being deleted and its agent is still enrolled: remove what the plugin made on the node
    (bridges, ports, files) through the agent, where it can be reached.

    :param node: the node record (without its agent secret; read it from the store to call the agent).
    :returns: ``None``, or (possibly through an awaitable) a list of what could not be removed, each a
        dict with a ``reason``; the delete answer reports them. Not firstresult: all are awaited.
    """


@hookspec
def kvmdesk_node_removed(core: "Core", node: Mapping[str, Any]) -> Optional[Awaitable[None]]:
    """A node was deleted from the controller: forget what other plugins keep about it.

    :param node: the deleted node record (without its agent secret).
    :returns: ``None`` or an awaitable; all are awaited. Not firstresult.
    """


@hookspec
def kvmdesk_domain_event(core: "Core", node: Mapping[str, Any], event: Mapping[str, Any]) -> Optional[Awaitable[None]]:
    """A node's agent reported a libvirt domain lifecycle event (forwarded, signed, in order).

    :param node: the node record of the agent that reported it (without its agent secret).
    :param event: ``{"uuid", "name", "event", "detail", "seq", "at"}``: the domain's uuid and name,
        libvirt's event and detail names (``started``/``booted``, ``stopped``/``destroyed``, ...), the
        agent's sequence number and the Unix time the agent saw it.
    :returns: ``None`` or an awaitable; every implementation is awaited before the next event.
        Not firstresult.
    """


@hookspec
def kvmdesk_domain_spec(core: "Core", spec: dict[str, Any], owner: Mapping[str, Any]) -> None:
    """Adjust a domain spec before the controller sends it to a node's agent (in place).

    The agent renders the one libvirt XML from the spec (:mod:`kvmdesk.agent.domains.xml`), so this
    is where a plugin changes a domain: vCPU, memory, disk buses, NIC model, ``on_reboot``...  The
    result is validated on the agent (:class:`kvmdesk.protocol.domains.DomainSpec`); an invalid
    change makes the operation fail with an error naming the field.

    :param spec: the :class:`~kvmdesk.protocol.domains.DomainSpec` fields as a dict; change it in place.
    :param owner: what the domain is for: ``{"kind": "template", ...the template record}``.
    :returns: nothing. Not firstresult: every implementation runs, in registration order.
    """


@hookspec
def kvmdesk_login_refused(core: "Core", username: str, address: str, reason: str) -> None:
    """A login was refused: unknown user, wrong password, disabled account or locked out.

    :param username: the name that was tried (never the password).
    :param address: the client's IP address.
    :param reason: ``bad_credentials``, ``disabled`` or ``locked``.
    """
