"""Collections of the network plugin, their indexes, and the shared collections it reads."""
from __future__ import annotations

from kvmdesk.core.store import Index

SWITCHES = "vswitchs"
UPLINKS = "vswitch_uplinks"
NETWORKS = "data_networks"
SUBNETS = "subnets"
ALLOCATIONS = "ip_allocations"
CURSORS = "ip_cursors"
NICS = "node_nics"
IP_INFOS = "node_ip_infos"

#: Owned by the nodes plugin; read here (uplinks, pools, management addresses).
NODES = "nodes"
POOLS = "resource_pools"

INDEXES = [
    Index(SWITCHES, ["uuid"], unique=True),
    Index(SWITCHES, ["name"], unique=True),
    Index(UPLINKS, ["vswitch_uuid", "node_uuid"], unique=True),
    # An OVS port lives in one bridge: a NIC is the uplink of one switch at most.
    Index(UPLINKS, ["nic_uuid"], unique=True),
    Index(UPLINKS, ["node_uuid"]),
    Index(NETWORKS, ["uuid"], unique=True),
    Index(NETWORKS, ["name"], unique=True),
    # One data network per VLAN tag of a switch (tag 0: the one network of a flat switch).
    Index(NETWORKS, ["switch_uuid", "tag"], unique=True),
    Index(SUBNETS, ["uuid"], unique=True),
    Index(SUBNETS, ["network_uuid", "name"], unique=True),
    # The IP allocator's guarantee: one holder per address of a subnet.
    Index(ALLOCATIONS, ["subnet_uuid", "ip"], unique=True),
    Index(ALLOCATIONS, ["owner"]),
    Index(CURSORS, ["subnet_uuid"], unique=True),
    Index(NICS, ["uuid"], unique=True),
    Index(NICS, ["node_uuid", "nic"], unique=True),
    Index(IP_INFOS, ["uuid"], unique=True),
    Index(IP_INFOS, ["node_uuid", "ip"], unique=True),
    Index(IP_INFOS, ["nic_uuid"]),
    Index(IP_INFOS, ["ip"]),
]
