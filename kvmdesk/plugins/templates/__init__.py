"""Built-in plugin ``templates``: teaching (classify 1) and personal (classify 2) desktop templates
(contract #64-#78).

A template is a domain on one node of its pool (its ``host``), defined by that node's agent from a
domain spec (:mod:`kvmdesk.protocol.domains`): a system disk that is a qcow2 overlay on a base image,
empty data disks, a NIC on its data network's bridge and VLAN, VNC with its own password.

For other plugins:

- ``kvmdesk_usage(kind="template", uuid)``: answer it while desktop groups use a template (deleting
  it is refused then).
- ``kvmdesk_domain_spec(core, spec, owner)``: adjust a domain spec before it is sent to the agent.
- ``core.extensions["templates.usage_counts"]``: set by a desktops plugin, gives the query its
  ``desktop_count`` / ``instance_count`` (0 without it).
- Templates answer ``kvmdesk_usage`` for base images, ISOs, data networks, subnets, pools and nodes.

Work that touches nodes runs as ``core.jobs`` jobs (kinds ``templates.create``, ``templates.copy``,
``templates.save`` (resumed after a restart), ``templates.<power action>``, ``templates.delete``);
``run_date`` saves are ``core.scheduler`` entries (:mod:`.schedule`); version files an unreachable
node kept at a delete are removed when it answers again (:mod:`.leftovers`).
"""
from kvmdesk.plugins.templates.plugin import *  # noqa: F401,F403  (the hook implementations)
