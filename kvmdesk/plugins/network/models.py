"""Request bodies of the network endpoints (contract #10-#16, #42-#58).

Addresses stay strings here: :mod:`.addressing` checks them with :mod:`ipaddress` so that the error
names the field and says what is wrong with the value.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kvmdesk.api.models import Model, Name, OptionalName

Desc = Annotated[Optional[str], Field(default=None, max_length=1024)]


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _vlan(value: Any) -> Any:
    # The contract's edit table types vlan_id as str while its examples send an integer: take both.
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


SwitchType = Annotated[Literal["flat", "vlan"], BeforeValidator(_lower)]
VlanId = Annotated[Optional[int], BeforeValidator(_vlan)]


# -- subnets -------------------------------------------------------------------------------------------


class SubnetCreate(Model):
    name: Name
    start_ip: str
    end_ip: str
    netmask: str
    gateway: str
    dns1: str
    dns2: Optional[str] = None
    desc: Desc = None


class SubnetEdit(Model):
    name: Optional[Name] = None
    start_ip: Optional[str] = None
    end_ip: Optional[str] = None
    netmask: Optional[str] = None
    gateway: Optional[str] = None
    dns1: Optional[str] = None
    dns2: Optional[str] = None
    desc: Desc = None


# -- data networks ----------------------------------------------------------------------------------


class NetworkCreate(Model):
    name: Name
    switch_uuid: str
    vlan_id: VlanId = None
    desc: Desc = None
    subnet_info: Optional[SubnetCreate] = None


class NetworkEdit(Model):
    name: Optional[Name] = None
    vlan_id: VlanId = None
    desc: Desc = None


# -- virtual switches --------------------------------------------------------------------------------


class Uplink(Model):
    node_uuid: str
    nic_uuid: str
    # The contract's own examples echo these display names back: accepted and ignored.
    node_name: Optional[OptionalName] = None
    nic_name: Optional[OptionalName] = None


class SwitchCreate(Model):
    name: Name
    type: SwitchType
    desc: Desc = None
    uplinks: list[Uplink]


class SwitchEdit(Model):
    name: Optional[Name] = None
    type: Optional[SwitchType] = None
    desc: Desc = None
    uplinks: Optional[list[Uplink]] = None


# -- node NICs, addresses and bonds -----------------------------------------------------------------


class IpInfo(Model):
    """A secondary address of a NIC (#10, #11).

    The contract's examples send the fields flat while its tables name a wrapping object (``ip_info``
    for #10, ``ip`` for #11): both spellings are taken.
    """

    ip: str
    netmask: str
    gateway: Optional[str] = None
    dns1: Optional[str] = None
    dns2: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) == 1:
            (key, inner), = data.items()
            if key in ("ip_info", "ip") and isinstance(inner, dict):
                return inner
        return data


class BondAddress(Model):
    ip: str
    netmask: str


class GateInfo(Model):
    gateway: Optional[str] = None
    dns1: Optional[str] = None
    dns2: Optional[str] = None


BOND_MODES = {0: "balance-rr", 1: "active-backup", 6: "balance-alb"}


class _BondFields(Model):
    mode: int = Field(json_schema_extra={"enum": list(BOND_MODES)})
    slaves: list[str] = Field(min_length=1)
    ip_list: list[BondAddress]
    gate_info: GateInfo = GateInfo()

    @field_validator("mode")
    @classmethod
    def _supported_mode(cls, mode: int) -> int:
        if mode not in BOND_MODES:
            supported = ", ".join(f"{m} ({n})" for m, n in BOND_MODES.items())
            raise PydanticCustomError("bond_mode", "bond mode {mode} is not supported; use {supported}",
                                      {"mode": mode, "supported": supported})
        return mode


class BondCreate(_BondFields):
    bond_name: str = Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.-]+$")


class BondEdit(_BondFields):
    pass


class Inherit(Model):
    nic_uuid: str
    ip_uuid: str


class BondDelete(Model):
    inherit_infos: list[Inherit] = []


# -- management and image networks -----------------------------------------------------------------


class RoleMove(Model):
    old_ip_uuid: str
    new_ip_uuid: str
    # Named by the contract's parameter table; the ip uuids already say everything.
    node_uuid: Optional[str] = None
    nic_uuid: Optional[str] = None


class RoleMoves(Model):
    uplinks: list[RoleMove] = Field(min_length=1)
