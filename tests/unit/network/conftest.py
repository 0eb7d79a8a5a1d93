"""Fixtures of the network plugin's tests that need the machine: namespaces and a private Open vSwitch."""
from kvmdesk.agent.net.testing import namespaces, private_ovs  # noqa: F401 (fixtures)
