"""Built-in plugin ``network``: virtual switches, data networks and subnets, IP allocation, node NICs,
bonds, and the management and image networks (contract #10-#16, #38-#40, #42-#58).

For other plugins:

- ``core.extensions["ipam"]`` (:class:`~kvmdesk.plugins.network.ipam.IPAM`): ``allocate(subnet_uuid,
  ip=None, owner=...)``, ``release(subnet_uuid, ip)``, ``release_owner(owner)``; atomic, persistent.
- ``core.extensions["network"]`` (:class:`~kvmdesk.plugins.network.nics.NodeNetworks`): a node's NICs
  and addresses as the contract shows them (``node_interfaces``), ``sync_node`` after adding a node,
  ``forget_node`` after deleting one.
- ``core.extensions["default_switch"]``: ``await f(core)`` gives the default switch (check_node_virt).
- Deleting a data network or a subnet asks ``core.usage("data_network", uuid)`` and
  ``core.usage("subnet", uuid)``: answer ``kvmdesk_usage`` for those kinds while templates, desktops
  or groups use them (a subnet with addresses handed out by the allocator is refused anyway).
- A node's agent says where a data network lives on that node: ``GET /agent/v1/net/networks/{uuid}``
  gives ``{"bridge", "tag"}`` for ``<interface type='bridge'><source bridge=.../><virtualport
  type='openvswitch'/><vlan><tag id=.../></vlan>``; ``POST .../ports {"port"}`` attaches a port by hand.

How changes reach the nodes: :mod:`.dataplane` (bridges) and :mod:`.nics` (NICs, addresses, bonds);
nodes that were offline are brought in step by :mod:`.sync` when their watcher sees them return.
"""
from kvmdesk.plugins.network.plugin import *  # noqa: F401,F403  (the hook implementations)
