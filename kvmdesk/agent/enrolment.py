"""The agent's side of enrolment: the long-term secret shared with one controller.

The secret lives in ``<data_dir>/enrolment.json``, created with mode 0600 and replaced atomically.
Policy (documented in ``agent-defaults.toml``):

- not enrolled: the enrolment password enrols any controller;
- enrolled: the password enrols again only when the request is also signed with the current secret,
  i.e. the same controller re-enrolling; the secret is then rotated.  Anyone else gets a conflict and
  the operator either deletes the node on its controller (which releases the agent, ``unenrol``) or
  removes the file.
"""
from __future__ import annotations

import json
import os
import uuid as uuidlib
from pathlib import Path
from typing import Any, Optional

import attrs

from kvmdesk.core.agentauth import new_secret

FILE_NAME = "enrolment.json"


@attrs.frozen
class Enrolment:
    """One enrolment.

    :param agent_id: names this enrolment; the agent sends it with the events it posts.
    :param secret: the shared secret (never logged).
    :param controller_id: the controller that enrolled.
    :param controller_url: where events go (the controller's API base, ``http://host:port/api/v1.0``).
    :param enrolled_at: Unix time.
    """

    agent_id: str
    secret: str = attrs.field(repr=False)
    controller_id: str
    controller_url: str
    enrolled_at: float


@attrs.define
class EnrolmentStore:
    """Reads and writes the enrolment file of a data directory."""

    data_dir: Path
    _current: Optional[Enrolment] = attrs.field(default=None, init=False)
    _loaded: bool = attrs.field(default=False, init=False)

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / FILE_NAME

    @property
    def current(self) -> Optional[Enrolment]:
        if not self._loaded:
            self._current = self._read()
            self._loaded = True
        return self._current

    def _read(self) -> Optional[Enrolment]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the enrolment file {self.path}: {exc}") from exc
        return Enrolment(**{field.name: raw[field.name] for field in attrs.fields(Enrolment)})

    def enrol(self, controller_id: str, controller_url: str, now: float) -> Enrolment:
        """Create (or rotate) the enrolment with a new secret, and save it (mode 0600)."""
        enrolment = Enrolment(str(uuidlib.uuid4()), new_secret(), controller_id, controller_url, now)
        self._write(attrs.asdict(enrolment))
        self._current, self._loaded = enrolment, True
        return enrolment

    def clear(self) -> None:
        """Forget the enrolment (the password enrols again)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._current, self._loaded = None, True

    def _write(self, doc: dict[str, Any]) -> None:
        directory = Path(self.data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (FILE_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(doc, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
