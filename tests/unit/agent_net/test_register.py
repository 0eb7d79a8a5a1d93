"""How the agent's app plugs the network routes in: settings from ``agent.config``, no router token."""
from types import SimpleNamespace

from twisted.internet import reactor

from kvmdesk.agent.net.routes import register_routes
from kvmdesk.api.router import Router
from kvmdesk.core.config import Config


def test_register_routes_reads_the_agent_config(tmp_path):
    config = Config()
    config.set("network.netns", "kvt-node")
    config.set("network.ovs_datapath", "netdev")
    config.set("network.ovs_rundir", str(tmp_path))
    config.set("network.ovs_timeout", 3)
    agent = SimpleNamespace(config=config, reactor=reactor)
    router = Router(agent, prefix="/agent/v1")
    net = register_routes(router, agent)
    assert net.netlink.netns == "kvt-node"
    assert (net.ovs.datapath, net.ovs.db, net.ovs.timeout) == ("netdev", f"unix:{tmp_path}/db.sock", 3)
    endpoints = {(e.method, e.path): e for e in router.registry}
    assert ("PUT", "/net/switches/{switch_uuid}") in endpoints and ("POST", "/net/bonds") in endpoints
    # the agent's signed-request wrapper authenticates; the router must not ask for a token
    assert not any(e.auth for e in endpoints.values())


def test_defaults_are_the_production_ones(monkeypatch):
    monkeypatch.delenv("OVS_RUNDIR", raising=False)
    agent = SimpleNamespace(config=Config(), reactor=reactor)
    net = register_routes(Router(agent, prefix="/agent/v1"), agent)
    assert net.netlink.netns is None
    assert (net.ovs.datapath, net.ovs.db) == ("system", "unix:/var/run/openvswitch/db.sock")
