"""Built-in plugin ``desktops``: teaching groups, teaching desktop groups and their desktops (#79-#98).

Endpoints (under ``/api/v1.0``):

- ``/education/group``: create (POST), edit (PUT), delete (DELETE, batch), paged query (GET) with
  ``network_name``, ``subnet_name``, the subnet's range, ``terminal_count``, ``desktop_count`` and
  ``instance_count``.

Decisions where the contract is silent:

- A teaching group's terminal range (``start_ip``-``end_ip``) need not lie inside the subnet (the
  document's own example has it outside: terminals are physical machines, often on another
  segment), but it must not overlap the subnet's address range, which the IPAM hands to desktops
  (409, code 6004); it holds at most 4096 addresses.
- Group names are one namespace with the user groups (:mod:`kvmdesk.core.group_names`): a clash is
  409, code 6001.  Deleting a teaching group that still has desktop groups is refused (409, 6005);
  other plugins can refuse too through ``kvmdesk_usage(kind="teaching_group")``.
- ``terminal_count`` counts the ``terminals`` records of the group; no feature registers terminals
  yet, so it is 0 until one does.
- This plugin answers ``kvmdesk_usage`` for ``data_network`` and ``subnet`` while teaching groups
  name them.
"""
from kvmdesk.plugins.desktops.plugin import *  # noqa: F401,F403  (the hook implementations)
