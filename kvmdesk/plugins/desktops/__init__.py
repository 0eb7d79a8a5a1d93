"""Built-in plugin ``desktops``: teaching groups, teaching desktop groups and their desktops (#79-#98).

Endpoints (under ``/api/v1.0``):

- ``/education/group``: create (POST), edit (PUT), delete (DELETE, batch), paged query (GET) with
  ``network_name``, ``subnet_name``, the subnet's range, ``terminal_count``, ``desktop_count`` and
  ``instance_count``.
- ``/education/desktop``: actions ``create``, ``start``, ``stop``, ``reboot``, ``active``, ``inactive``
  (POST), delete (DELETE, batch), edit (PUT: name, restore flags, order), paged query (GET) with
  counts and the names of the group, template, pool and network.
- ``/education/instance``: actions ``start``, ``stop``, ``reboot``, ``create`` (add desktops),
  ``get_console`` (POST), delete (DELETE, batch), paged query (GET, ``desktop_uuid=<group>``).

How it works (one module each): :mod:`.planner` checks ``create_info`` against the pool's nodes and
their capacity (pure); :mod:`.provisioning` reads the stored nodes, checks names and takes addresses
from the IPAM all or none; :mod:`.creation` makes the desktops (overlays and domains) and removes
everything again if any node fails; :mod:`.admission` admits starts per node (boot storms);
:mod:`.power` is what happens to one desktop; :mod:`.domain_ops` is every call to a node's agent
(the domain protocol of :mod:`kvmdesk.protocol.domains`); :mod:`.events` and :mod:`.reconcile` keep
desktop states from lifecycle events and catch what they missed.

Decisions where the contract is silent:

- A teaching group's terminal range (``start_ip``-``end_ip``) need not lie inside the subnet (the
  document's own example has it outside: terminals are physical machines, often on another
  segment), but it must not overlap the subnet's address range, which the IPAM hands to desktops
  (409, code 6004); it holds at most 4096 addresses.
- Group names are one namespace with the user groups (:mod:`kvmdesk.core.group_names`): a clash is
  409, code 6001.  Deleting a teaching group that still has desktop groups is refused (409, 6005);
  other plugins can refuse too through ``kvmdesk_usage(kind="teaching_group")``.
- ``terminal_count`` counts the terminals (thin clients) whose address lies in the group's terminal
  range.  The contract has counts of terminals but no endpoint that makes one: beyond it,
  ``/education/terminal`` (:mod:`.terminals`) takes a terminal's announcement (POST: MAC, address,
  name; repeated, it refreshes ``last_seen``), lists them (GET, paged, with their teaching group and
  ``online``) and deletes them (DELETE, batch).  The same records give the dashboard's
  ``sum_terminal_cnt`` and ``online_terminal_cnt`` (``kvmdesk_resource_counts``; online: announced
  within ``[desktops] terminal_online_seconds``).
- This plugin answers ``kvmdesk_usage`` for ``data_network`` and ``subnet`` (teaching and desktop
  groups), ``template``, ``resource_pool`` and ``teaching_group`` (desktop groups) and ``node``
  (desktops placed on it).
- ``create_info`` is checked whole before anything is made: every problem (unknown node, node of
  another pool, offline node, not enough vCPUs/RAM/disk, template version missing on the node) is
  listed in the error's ``data.problems``; the message is the first one.  Capacity counts every
  desktop already placed on the node, running or not (a class starts all of them at once):
  ``[desktops] cpu_overcommit``, ``ram_overcommit``, ``ram_reserve_gib``, ``disk_per_desktop_gib``.
- The counts of ``create_info`` must add up to ``instance_num``; names that would need more than
  ``postfix`` digits are refused (not widened); names that exist anywhere are refused (409, all
  listed in ``data.names``).  Added desktops (#94) continue after the group's highest number.
- A group create that fails on any node removes every overlay and domain it made on every node,
  releases the addresses and deletes the records; the answer is the failing desktop's error.
- **Deleting a running desktop stops it first** (destroy), then removes its domain, overlays and
  address: it is not refused, a classroom's desktops are disposable.
- Stopping a restore desktop destroys it (its disk is thrown away anyway); other desktops shut down
  cleanly.  Rebooting a restore desktop is off, fresh overlays, on (through admission).
- A restore desktop stopped by its guest (``on_reboot=destroy`` makes a guest reboot end the domain)
  while it is meant to be on comes back on fresh overlays: a guest *shutdown* does too (classroom
  desktops stay on until an administrator stops them).  A restore desktop moves to the template's
  current version at that restore, if the version is on its node; other desktops keep the version
  they were made from (the contract has no "upgrade" endpoint: not built).
- A group batch (start/stop/reboot/delete of groups) fails a group when any of its desktops failed
  (code 6045, the count and the first reason; every desktop's failure in ``data.failures``); the
  other desktops went on.  A desktop batch reports each desktop.
- ``active_time`` is the seconds since the desktop's ``up_time`` while it runs, 0 otherwise.
- Every batch runs as a persisted job (``core.jobs.run_items``): the answer adds ``job_id``; the
  job keeps each item's result (``GET /api/v1.0/jobs/{uuid}``).
- Timetables (beyond the contract): :mod:`.timetables`.

Personal desktops and the desktop users' portal (issue 17: #113-#134 and the portal):

- ``/personal/desktop/`` (:mod:`.personal_groups`), ``/personal/desktop/random/``
  (:mod:`.random_bindings`), ``/personal/desktop/static/`` (:mod:`.static_bindings`),
  ``/personal/instance/`` (:mod:`.personal_instances`), ``/portal/...`` (:mod:`.portal`,
  :mod:`.portal_auth`, :mod:`.broker`).  Personal desktops are records of the ``desktops`` collection
  like teaching ones (creation, power, events and reconcile act on them unchanged); their groups are
  ``personal_groups``, the random bindings ``random_bindings``.
- #113 without a network (``allocate_type`` 1) leaves the addresses to the environment's DHCP; fixed
  addresses (``allocate_type`` 2) are ``allocate_start`` and the next ones, all inside the subnet's
  range and free, or the create is refused whole (6513, 6514).  ``allocates`` (the example's
  ``allocation`` is taken too) binds desktops by name to users of one user group.
- ``change_group`` (#126) matches users (by name) to desktops (by name) and answers
  ``{"bound_num", "unbound_users", "free_instances"}``: more users than desktops is not an error, the
  users left without are listed.  ``change_bind`` (#125) with ``user_uuid: ""`` unbinds; a user keeps
  one desktop per group (rebinding moves them).
- The lists (#124, #127, #134) take the contract's group parameter and, like every list, the generic
  search; without the group parameter they list every group's rows.
- A random desktop is claimed with one atomic ``find_one_and_update`` (``holder: None`` -> the user);
  a user holds at most one desktop per group and gets it again on the next request; it is freed on
  logout or when the session has seen no request for ``[desktops.portal] idle_timeout`` seconds.  A
  running restore desktop is restored (the power module's reboot) before it is free again; one that
  cannot be restored is left in ``error``, which no claim takes.
- Entering maintenance does not take desktops from users who hold them; it refuses new requests.
- ``websockify_url`` is ``null`` with ``console_error`` where the controller has no console module.
"""
from kvmdesk.plugins.desktops.plugin import *  # noqa: F401,F403  (the hook implementations)
