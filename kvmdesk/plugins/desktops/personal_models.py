"""Request models of personal desktop groups and their random bindings."""
from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field

from kvmdesk.api.models import Model, OptionalName
from kvmdesk.plugins.desktops.models import Flag, GroupName, Prefix, Ref, Uuid


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError("expected an IPv4 address") from None


IPv4Text = Annotated[str, AfterValidator(_ipv4)]
#: The contract says float; JSON's 1 and 1.5 are both taken.
Ram = Annotated[float, Field(gt=0, le=1024), BeforeValidator(lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class GroupRef(Model):
    uuid: Uuid
    name: Optional[OptionalName] = None


class PersonalGroups(Model):
    """The contract's batch of personal desktop groups: ``{"desktops": [{"uuid", "name"}]}``."""

    desktops: list[GroupRef] = Field(min_length=1)


class BindingRef(Model):
    """A user group to bind (#122): its uuid and (informative) name."""

    group_uuid: Uuid
    group_name: Optional[OptionalName] = None


class BindGroups(Model):
    desktop_uuid: Uuid
    desktop_name: Optional[OptionalName] = None
    groups: list[BindingRef] = Field(min_length=1)


class BindingId(Model):
    """A binding to remove (#123): the binding's uuid and (informative) user group name."""

    uuid: Uuid
    group_name: Optional[OptionalName] = None


class UnbindGroups(Model):
    desktop_uuid: Uuid
    desktop_name: Optional[OptionalName] = None
    groups: list[BindingId] = Field(min_length=1)


# -- personal desktop groups (#113, #117) -------------------------------------------------------------


class Allocation(Model):
    """A static desktop's user (#113 ``allocates``): the user and the desktop's name."""

    user_uuid: Uuid
    name: OptionalName


class PersonalGroupCreate(Model):
    name: GroupName
    template_uuid: Uuid
    pool_uuid: Uuid
    network_uuid: Optional[Uuid] = None
    subnet_uuid: Optional[Uuid] = None
    allocate_type: Literal[1, 2]
    allocate_start: Optional[IPv4Text] = None
    vcpu: int = Field(ge=1, le=128)
    ram: Ram
    sys_restore: Flag
    data_restore: Flag
    desktop_type: Literal[1, 2]
    groups: Optional[list[Uuid]] = None
    # The contract's table says ``allocates``, its example ``allocation``: both are taken.
    allocates: Optional[list[Allocation]] = Field(default=None, validation_alias=AliasChoices("allocates", "allocation"))
    group_uuid: Optional[Uuid] = None
    instance_num: int = Field(ge=1, le=5000)
    prefix: Prefix
    postfix: int = Field(ge=1, le=9)
    postfix_start: int = Field(default=1, ge=0)
    create_info: dict[str, int]



def inconsistency(body: PersonalGroupCreate) -> Optional[tuple[str, str]]:
    """``(field, reason)`` when fields of a create contradict each other, else ``None``.

    Checked by the handler, not the model: the OpenAPI document cannot state these rules, so they are
    refusals of meaning (an ``INVALID_PARAM`` naming the field), not of shape.
    """
    if (body.network_uuid is None) != (body.subnet_uuid is None):
        return "subnet_uuid", "network_uuid and subnet_uuid go together"
    if body.allocate_type == 2 and (body.subnet_uuid is None or body.allocate_start is None):
        return "allocate_start", "allocate_type 2 (fixed) needs network_uuid, subnet_uuid and allocate_start"
    if body.desktop_type == 1 and (body.allocates or body.group_uuid):
        return "group_uuid", "allocates and group_uuid are for static groups (desktop_type 2)"
    if body.desktop_type == 2 and body.groups:
        return "groups", "groups is for random groups (desktop_type 1)"
    return None


# -- personal desktops (#128-#134) --------------------------------------------------------------------


class PersonalDesktops(Model):
    desktop_uuid: Uuid
    desktop_name: OptionalName
    desktop_type: Literal[2]
    instances: list[Ref] = Field(min_length=1)


class PersonalDesktopsAdd(Model):
    desktop_uuid: Uuid
    # The contract's table misspells it ``dekstop_name``; its example says ``desktop_name``.
    desktop_name: OptionalName = Field(validation_alias=AliasChoices("desktop_name", "dekstop_name"))
    desktop_type: Literal[2]
    instance_num: int = Field(ge=1, le=5000)
    prefix: Optional[Prefix] = None
    create_info: dict[str, int]


# -- static bindings (#125-#126) ------------------------------------------------------------------------


class ChangeBind(Model):
    instance_uuid: Uuid
    instance_name: OptionalName
    #: ``""`` removes the desktop's binding.
    user_uuid: str
    user_name: OptionalName


class ChangeGroup(Model):
    desktop_uuid: Uuid
    desktop_name: OptionalName
    group_uuid: Optional[Uuid] = None
    group_name: Optional[OptionalName] = None
