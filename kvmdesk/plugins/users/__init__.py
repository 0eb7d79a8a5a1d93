"""Built-in plugin ``users``: desktop users and user groups (contract #99-#112).

These are the people who log in to personal desktops, not the administrators of the API.

Endpoints (under ``/api/v1.0``):

- ``/personal/group``: create (POST), edit (PUT), delete (DELETE, batch), paged query (GET) with
  ``user_num``, ``enable_num``, ``disable_num``, ``name_with_num`` and the group's ``users``;
- ``/personal/user/``: actions ``single_create``, ``multi_create``, ``enable``, ``disable``, ``move``,
  ``export`` (POST); delete (DELETE, batch); update (PUT); paged query (GET, ``group=<uuid>`` and
  the generic search on ``uuid``, ``user_name``, ``name``, ``phone``, ``email``, ``enabled``, ``group``);
- ``/personal/user/upload``: import an .xlsx (multipart: the file and ``enable``);
- ``/personal/user/download``: the signed, expiring link an export answers (no bearer token needed).

Decisions where the contract is silent or where we depart from it on purpose:

- **Passwords are never returned.**  The contract's responses carry ``passwd`` (an md5 of the
  password, or the password itself); we drop that field from every response on purpose: passwords
  are stored only as Argon2id hashes (:mod:`kvmdesk.core.passwords`: OWASP's minimum, 19 MiB, t=2,
  p=1), hashed and verified in the hashing thread pool, and neither they nor their hashes leave the
  controller, in responses, exports or the operation log.  For the same reason ``passwd`` is
  optional in an update (``value.passwd`` empty or absent keeps the password): a client cannot send
  back a password it was never given.  The desktop-login flow checks credentials with
  :func:`verify_user_password`.
- A ``multi_create`` batch shares one password, hashed once for the batch (the users of a batch share
  the hash and its salt).  Names that exist are failures; the others are created.  The numbers must
  fit in ``postfix`` digits (``postfix=2`` with 150 users is refused, not silently widened).
- Deleting a user group that still has users is refused (409, code 7001): delete or move them first.
  Other plugins can refuse too through ``kvmdesk_usage(kind="user_group")``.
- Group names are one namespace with the teaching groups (:mod:`kvmdesk.core.group_names`, a shared
  collection with a unique index that both plugins claim names in): a clash is 409, code 7002.
- Batch operations answer ``success_num``, ``failed_num`` and ``failures``; with one item, a failure is
  the error answer itself (as every batch of the API).
- The group query lists at most ``[users] group_users_limit`` users per group (``users_truncated``
  says when there are more).
- Export: the .xlsx format is described in :mod:`.sheets` (the password column is always empty); the
  answer adds ``expires_at`` and the batch counts to the contract's ``url``, which points at
  ``/personal/user/download`` here (signed with a per-process HMAC key, valid ``[users] export_ttl``
  seconds, files in ``<data_dir>/exports`` deleted once expired and at start-up).
- Import: see :mod:`.imports` (whole-file refusals, per-row reasons with row numbers, ``enable``
  semantics).  Users imported without a password cannot log in until an administrator sets one; so
  an export imported back restores the users, their details, groups and states, but not passwords.
  The upload streams into a multipart parser (``stream=`` endpoint): an oversize body is refused
  while it arrives, before it is stored.
- Responsiveness: .xlsx files are read and written by openpyxl in a child process
  (:mod:`.sheet_jobs`), never in a thread of the reactor's process (pure-Python work there holds
  the GIL); bulk writes go through ``insert_many``/``update_many`` in bounded chunks; an import hashes
  its distinct passwords one per core but one (``[users] hash_concurrency``).

Configuration: the ``[users]`` section, documented in :data:`kvmdesk.plugins.users.plugin.DEFAULTS`.
"""
from kvmdesk.plugins.users.accounts import verify_user_password
from kvmdesk.plugins.users.plugin import *  # noqa: F401,F403  (the hook implementations)

__all__ = ["verify_user_password"]
