"""Request models of personal desktop groups and their random bindings."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from kvmdesk.api.models import Model
from kvmdesk.plugins.desktops.models import Uuid


class GroupRef(Model):
    uuid: Uuid
    name: Optional[str] = None


class PersonalGroups(Model):
    """The contract's batch of personal desktop groups: ``{"desktops": [{"uuid", "name"}]}``."""

    desktops: list[GroupRef] = Field(min_length=1)


class BindingRef(Model):
    """A user group to bind (#122): its uuid and (informative) name."""

    group_uuid: Uuid
    group_name: Optional[str] = None


class BindGroups(Model):
    desktop_uuid: Uuid
    desktop_name: Optional[str] = None
    groups: list[BindingRef] = Field(min_length=1)


class BindingId(Model):
    """A binding to remove (#123): the binding's uuid and (informative) user group name."""

    uuid: Uuid
    group_name: Optional[str] = None


class UnbindGroups(Model):
    desktop_uuid: Uuid
    desktop_name: Optional[str] = None
    groups: list[BindingId] = Field(min_length=1)
