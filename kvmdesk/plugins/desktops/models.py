"""Request models of the desktops plugin (teaching groups, desktop groups, desktops)."""
from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, StringConstraints, WithJsonSchema

from kvmdesk.api.models import Model, Name, OptionalName

#: Desktop names are domain names: letters, digits and _ . - , starting with a letter or digit.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _blank(value: Any) -> Any:
    return "" if value is None else value


#: Group names follow the shared name rules (no control characters, stripped, at most 64).
GroupName = Name
Desc = Annotated[str, BeforeValidator(_blank), StringConstraints(max_length=1024)]
Uuid = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
#: Desktop names become libvirt domain names: a prefix of safe characters.
Prefix = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=48, pattern=_NAME.pattern)]
#: The contract's restore flags: 1 or 0 (a limit the OpenAPI document states).
Flag = Annotated[int, Field(ge=0, le=1)]


class Ref(Model):
    """One item of a batch: the uuid identifies it; the name (required by the contract) is informative."""

    uuid: Uuid
    name: OptionalName


# -- teaching groups (#79-#82) ------------------------------------------------------------------------


class TeachingGroupCreate(Model):
    name: GroupName
    group_type: Literal[1]
    desc: Desc = ""
    network_uuid: Uuid
    subnet_uuid: Uuid
    start_ip: str
    end_ip: str


class TeachingGroupValue(Model):
    name: GroupName
    desc: Optional[Desc] = None
    network_uuid: Optional[Uuid] = None
    subnet_uuid: Optional[Uuid] = None
    start_ip: Optional[str] = None
    end_ip: Optional[str] = None


class TeachingGroupEdit(Model):
    uuid: Uuid
    name: OptionalName
    value: TeachingGroupValue


class TeachingGroupDelete(Model):
    groups: list[Ref] = Field(min_length=1)


# -- desktop groups (#83-#91) -------------------------------------------------------------------------


class DesktopGroupCreate(Model):
    name: GroupName
    group_uuid: Uuid
    template_uuid: Uuid
    pool_uuid: Uuid
    network_uuid: Uuid
    subnet_uuid: Uuid
    vcpu: int = Field(ge=1, le=128)
    # The contract says float; JSON's 1 and 1.5 are both accepted (strict mode would refuse the int).
    ram: Annotated[float, Field(gt=0, le=1024), BeforeValidator(lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)]
    sys_restore: Flag
    data_restore: Flag
    instance_num: int = Field(ge=1, le=5000)
    prefix: Prefix
    postfix: int = Field(ge=1, le=9)
    postfix_start: int = Field(default=1, ge=0)
    create_info: dict[str, int]


class DesktopGroups(Model):
    desktops: list[Ref] = Field(min_length=1)


class DesktopGroupValue(Model):
    name: Optional[GroupName] = None
    sys_restore: Optional[Flag] = None
    data_restore: Optional[Flag] = None
    order_num: Optional[int] = Field(default=None, ge=0, le=2**31 - 1)


class DesktopGroupEdit(Model):
    uuid: Uuid
    name: OptionalName
    value: DesktopGroupValue


# -- desktops (#92-#98) ---------------------------------------------------------------------------------


class DesktopsParam(Model):
    desktop_uuid: Uuid
    desktop_name: OptionalName
    desktop_type: Literal[1]
    instances: list[Ref] = Field(min_length=1)


class DesktopsDelete(Model):
    desktop_uuid: Uuid
    desktop_name: OptionalName
    # The contract's delete example says 2 (a copy of the personal one); a teaching desktop is 1.
    desktop_type: Literal[1]
    instances: list[Ref] = Field(min_length=1)


class DesktopsAdd(Model):
    desktop_uuid: Uuid
    desktop_name: OptionalName
    desktop_type: Literal[1]
    instance_num: int = Field(ge=1, le=5000)
    create_info: dict[str, int]


class ConsoleParam(Model):
    uuid: Uuid
    name: OptionalName


# -- terminals (beyond the contract: what makes #82's terminal_count true) -------------------------------


def _ipv4(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError("expected an IPv4 address") from None


Mac = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
Ipv4 = Annotated[str, BeforeValidator(_ipv4), WithJsonSchema({"type": "string", "format": "ipv4"})]


class TerminalAnnounce(Model):
    """A thin client saying it is there: its MAC identifies it, its address places it in a classroom."""

    mac: Mac
    ip: Ipv4
    name: OptionalName = ""


class TerminalsDelete(Model):
    terminals: list[Ref] = Field(min_length=1)
