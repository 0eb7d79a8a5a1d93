"""Fixtures of the network plugin's tests that need the machine: namespaces and a private Open vSwitch."""
from kvmdesk.testing.agent_net import namespaces, private_ovs  # noqa: F401 (fixtures)
