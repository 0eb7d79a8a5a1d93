"""Collections of the templates plugin, its indexes, and the other plugins' collections it reads."""
from __future__ import annotations

from kvmdesk.core.errors import Resource
from kvmdesk.core.store import Index

TEMPLATES = "templates"
#: Version files a template's delete could not remove from a node that was unreachable then, and what
#: a create or copy cut short made (one row per template and node: ``{uuid, template_uuid,
#: template_name, node_uuid, files: [{file_id, role}], domain (a uuid or None), cause, error}``); removed
#: when the node answers again (:mod:`.leftovers`).
LEFTOVERS = "template_leftovers"
#: Creates and copies under way (``{uuid, kind, template_uuid, template_name, host_uuid, nodes:
#: [{node_uuid, files}]}``): one a controller stop cut short is undone at the next start (:mod:`.intents`).
INTENTS = "template_intents"

#: Read here, owned by others: nodes and pools (nodes), base images, ISOs and transfers (storage),
#: networks, subnets and switches (network).  Written only through their services (IPAM, placement).
NODES = "nodes"
POOLS = "resource_pools"
BASE_IMAGES = "base_images"
ISOS = "isos"
TRANSFERS = "image_transfers"
NETWORKS = "data_networks"
SUBNETS = "subnets"
SWITCHES = "vswitchs"

INDEXES = [
    Index(TEMPLATES, ["uuid"], unique=True),
    Index(TEMPLATES, ["name"], unique=True),
    Index(TEMPLATES, ["pool_uuid"]),
    Index(TEMPLATES, ["host_uuid"]),
    Index(LEFTOVERS, ["uuid"], unique=True),
    Index(LEFTOVERS, ["node_uuid"]),
    Index(INTENTS, ["uuid"], unique=True),
]

#: Template states (the contract's ``status``), plus ``updating`` while a version is published.
ACTIVE, INACTIVE, ERROR, UPDATING = "active", "inactive", "error", "updating"
#: Storage roles of template disks on the nodes.
ROLE_SYSTEM, ROLE_DATA = 1, 2

#: The lifecycle hooks' kind (``kvmdesk_created/updated/deleted``) and ``kvmdesk_usage``'s.
KIND = "template"
#: How answers name things, in both languages.
TEMPLATE = Resource("模板", "template")
POOL = Resource("资源池", "resource pool")
BASE_IMAGE = Resource("基础镜像", "base image")
ISO = Resource("ISO", "ISO")
DISK = Resource("磁盘", "disk")
NODE = Resource("节点", "node")
TEMPLATE_IMAGE = Resource("模板镜像", "template image")
NETWORK = Resource("数据网络", "data network")
SUBNET = Resource("子网", "subnet")
SWITCH = Resource("虚拟交换机", "virtual switch")


def save_key(template_uuid: str) -> str:
    """The ``core.scheduler`` key of a template's pending ``run_date`` save."""
    return f"template.save:{template_uuid}"
