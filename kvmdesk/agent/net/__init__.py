"""The agent's network side: NICs, addresses and bonds through netlink, bridges through Open vSwitch.

The agent's HTTP app imports :mod:`kvmdesk.agent.net.routes` and calls its ``register_routes``.
"""
