"""Request bodies of the template endpoints (#64-#78), as the contract spells them."""
from __future__ import annotations

import ipaddress
from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from kvmdesk.api.models import Model

MAX_GB = 64 * 1024
Name = Field(min_length=1, max_length=64)


def _ip(value: Optional[str]) -> Optional[str]:
    if value in (None, ""):
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError("expected an IPv4 address") from None


class SystemDisk(Model):
    image_id: str = Field(min_length=1, max_length=64)
    size: int = Field(ge=1, le=MAX_GB)


class NewDataDisk(Model):
    inx: int = Field(ge=0, le=15)
    size: int = Field(ge=1, le=MAX_GB)


class TemplateCreate(Model):
    name: str = Name
    desc: Optional[str] = Field(default="", max_length=1024)
    os_type: str = Field(min_length=1, max_length=64)
    classify: Literal[1, 2]
    pool_uuid: str = Field(min_length=1, max_length=64)
    network_uuid: str = Field(min_length=1, max_length=64)
    subnet_uuid: str = Field(min_length=1, max_length=64)
    bind_ip: Optional[str] = None
    vcpu: int = Field(ge=1, le=128)
    ram: float = Field(gt=0, le=4096)
    system_disk: SystemDisk
    data_disks: list[NewDataDisk] = Field(max_length=15)

    _bind_ip = field_validator("bind_ip")(_ip)


class TemplateCopy(Model):
    template_uuid: str = Field(min_length=1, max_length=64)
    name: str = Name
    desc: Optional[str] = Field(default=None, max_length=1024)
    pool_uuid: str = Field(min_length=1, max_length=64)
    network_uuid: str = Field(min_length=1, max_length=64)
    subnet_uuid: str = Field(min_length=1, max_length=64)
    bind_ip: Optional[str] = None

    _bind_ip = field_validator("bind_ip")(_ip)


class ResyncParam(Model):
    """#76; ``path`` (the node's storage directory) is accepted and not needed: the role says where."""

    ipaddr: str = Field(min_length=1, max_length=64)
    role: Optional[Union[int, str]] = None
    image_id: str = Field(min_length=1, max_length=64)
    path: Optional[str] = Field(default=None, max_length=4096)
    version: Optional[int] = Field(default=None, ge=1)


class TemplateRef(Model):
    name: str = Field(default="", max_length=64)
    uuid: str = Field(min_length=1, max_length=64)


class TemplateBatch(Model):
    templates: list[TemplateRef] = Field(min_length=1, max_length=1000)


class SaveParam(TemplateRef):
    run_date: Optional[str] = Field(default=None, max_length=32)


class AttachSource(TemplateRef):
    iso_uuid: str = Field(min_length=1, max_length=64)


class ExistingDevice(Model):
    """A disk as the query shows it; only ``size`` may change (grow)."""

    uuid: str = Field(min_length=1, max_length=64)
    type: Optional[str] = None
    device_name: Optional[str] = None
    boot_index: Optional[int] = None
    size: int = Field(ge=1, le=MAX_GB)
    used: Optional[float] = None


class TemplateValue(Model):
    name: Optional[str] = Field(default=None, min_length=1, max_length=64)
    desc: Optional[str] = Field(default=None, max_length=1024)
    network_uuid: Optional[str] = None
    subnet_uuid: Optional[str] = None
    bind_ip: Optional[str] = None
    vcpu: Optional[int] = Field(default=None, ge=1, le=128)
    ram: Optional[float] = Field(default=None, gt=0, le=4096)
    devices: Optional[list[Union[ExistingDevice, NewDataDisk]]] = Field(default=None, max_length=16)

    _bind_ip = field_validator("bind_ip")(_ip)


class TemplateEdit(Model):
    uuid: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=64)
    value: TemplateValue
