"""Fixtures of the agent's network tests: a namespace with veth NICs, the same NICs in memory, and a
private Open vSwitch; each is skipped with the reason when the machine cannot provide it."""
import pytest

from kvmdesk.agent.net.netlink import MemoryNetlink, Netlink
from kvmdesk.testing.agent_net import Unavailable, namespaces, private_ovs  # noqa: F401 (fixtures)

#: The node's NICs in every netlink test: veth ends whose peers stay in the same namespace.
NICS = ("eth1", "eth2", "eth3")


@pytest.fixture
def node_ns(namespaces):
    """A namespace standing for a node, with NICs eth1-eth3 (up, no addresses)."""
    try:
        name = namespaces.add("node")
    except Unavailable as exc:
        pytest.skip(str(exc))
    for i, nic in enumerate(NICS, start=1):
        namespaces.veth(name, nic, name, f"peer{i}")
    return name


def memory_links():
    links = {}
    for i, nic in enumerate(NICS, start=1):
        links[nic] = {"kind": "veth", "up": True, "mac": f"02:00:00:00:00:0{i}", "mtu": 1500}
        links[f"peer{i}"] = {"kind": "veth", "up": True, "mac": f"02:00:00:00:01:0{i}", "mtu": 1500}
    links["lo"] = {"loopback": True, "up": True}
    return links


@pytest.fixture(params=["kernel", "memory"])
def netlink(request):
    """The real netlink in a namespace, and the in-memory kernel: one contract for both.

    The in-memory kernel lacks the bonding driver here, like the kernels of these machines.
    """
    if request.param == "kernel":
        return Netlink(netns=request.getfixturevalue("node_ns"))
    return MemoryNetlink(memory_links(), bonding=False)
