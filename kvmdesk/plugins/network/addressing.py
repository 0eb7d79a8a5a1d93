"""Address arithmetic with the standard library's :mod:`ipaddress`: parsing and subnet validation.

Pure functions, no I/O: every check raises an :class:`~kvmdesk.core.errors.ApiError` that names the
field and the value at fault.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Mapping, Optional

import attrs

from kvmdesk.core.errors import ApiError
from kvmdesk.plugins.network import errors as net_errors

IPv4 = ipaddress.IPv4Address
IPv4Net = ipaddress.IPv4Network


def parse_ip(field: str, value: Any) -> IPv4:
    """An IPv4 address in dotted-quad form (no leading zeros, no prefix)."""
    if isinstance(value, str):
        try:
            return ipaddress.IPv4Address(value.strip())
        except ValueError:
            pass
    raise ApiError(net_errors.BAD_ADDRESS, field=field, value=value)


def parse_netmask(field: str, value: Any) -> int:
    """A dotted netmask (``255.255.255.0``) or a prefix length (``24``); returns the prefix length."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if text.isdigit() and 0 < int(text) <= 32:
        return int(text)
    if text.count(".") == 3:
        try:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
        except ValueError:
            pass
        else:
            # ipaddress also takes host masks (0.0.0.255): accept only the netmask spelling.
            if prefix > 0 and netmask_text(prefix) == text:
                return prefix
    raise ApiError(net_errors.BAD_NETMASK, field=field, value=value)


def netmask_text(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


def network_of(ip: IPv4, prefix: int) -> IPv4Net:
    return ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)


def optional_dns(field: str, value: Optional[str]) -> str:
    """A DNS server address, or ``""`` when not given (the contract uses ``""`` for none)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return ""
    return str(parse_ip(field, value))


def check_host(field: str, ip: IPv4, network: IPv4Net) -> None:
    """``ip`` lies in ``network`` and is neither its network nor its broadcast address."""
    if ip not in network:
        raise ApiError(net_errors.OUTSIDE_NETWORK, field=field, value=str(ip), cidr=str(network))
    if network.prefixlen < 31:
        if ip == network.network_address:
            raise ApiError(net_errors.NOT_A_HOST, field=field, value=str(ip), cidr=str(network), what="network address")
        if ip == network.broadcast_address:
            raise ApiError(net_errors.NOT_A_HOST, field=field, value=str(ip), cidr=str(network), what="broadcast address")


@attrs.frozen
class SubnetSpec:
    """A validated subnet: the stored fields (``cidr`` derived) plus parsed values for checks."""

    name: str
    start: IPv4
    end: IPv4
    prefix: int
    gateway: IPv4
    dns1: str
    dns2: str

    @property
    def network(self) -> IPv4Net:
        return network_of(self.start, self.prefix)

    @property
    def size(self) -> int:
        return int(self.end) - int(self.start) + 1

    def contains(self, ip: IPv4) -> bool:
        return self.start <= ip <= self.end

    def fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start_ip": str(self.start),
            "end_ip": str(self.end),
            "netmask": netmask_text(self.prefix),
            "gateway": str(self.gateway),
            "cidr": str(self.network),
            "dns1": self.dns1,
            "dns2": self.dns2,
        }


def subnet_spec(values: Mapping[str, Any], *, prefix: str = "") -> SubnetSpec:
    """Validate a subnet's fields (``name, start_ip, end_ip, netmask, gateway, dns1, dns2``).

    :param prefix: prepended to field names in errors (``subnet_info.``).
    :raises ApiError: the first problem, naming its field.
    """
    start = parse_ip(prefix + "start_ip", values.get("start_ip"))
    end = parse_ip(prefix + "end_ip", values.get("end_ip"))
    mask = parse_netmask(prefix + "netmask", values.get("netmask"))
    gateway = parse_ip(prefix + "gateway", values.get("gateway"))
    network = network_of(start, mask)
    check_host(prefix + "start_ip", start, network)
    check_host(prefix + "end_ip", end, network)
    if start > end:
        raise ApiError(net_errors.RANGE_ORDER, start_ip=str(start), end_ip=str(end))
    check_host(prefix + "gateway", gateway, network)
    if start <= gateway <= end:
        raise ApiError(net_errors.GATEWAY_IN_RANGE, gateway=str(gateway), start_ip=str(start), end_ip=str(end))
    dns1 = optional_dns(prefix + "dns1", values.get("dns1"))
    if not dns1:
        raise ApiError(net_errors.BAD_ADDRESS, field=prefix + "dns1", value=values.get("dns1"))
    dns2 = optional_dns(prefix + "dns2", values.get("dns2"))
    return SubnetSpec(str(values.get("name") or ""), start, end, mask, gateway, dns1, dns2)


def spec_of_record(record: Mapping[str, Any]) -> SubnetSpec:
    """The spec of a stored subnet (already valid)."""
    return subnet_spec(record)


def check_no_overlap(spec: SubnetSpec, others: Iterable[Mapping[str, Any]]) -> None:
    """Refuse a subnet that clashes with another subnet of the same data network.

    Two subnets of one data network may share a CIDR (the contract's own example has two ranges of
    172.16.1.0/24), but their address ranges must be disjoint, neither gateway may lie in the other's
    range, and networks that overlap must be the same network (10.0.0.0/16 beside 10.0.1.0/24 on one
    segment is a mistake, not a design).
    """
    for record in others:
        other = spec_of_record(record)
        name = record.get("name") or record.get("uuid")
        if spec.start <= other.end and other.start <= spec.end:
            detail = f"{other.start}-{other.end}"
        elif other.contains(spec.gateway):
            detail = f"gateway {spec.gateway} is inside {other.start}-{other.end}"
        elif spec.contains(other.gateway):
            detail = f"its gateway {other.gateway} is inside {spec.start}-{spec.end}"
        elif spec.network.overlaps(other.network) and spec.network != other.network:
            detail = f"{spec.network} overlaps {other.network}"
        else:
            continue
        raise ApiError(net_errors.SUBNET_OVERLAP, name=name, detail=detail)


def interface_address(ip_field: str, ip: Any, mask_field: str, netmask: Any) -> tuple[IPv4, int]:
    """An address to configure on a NIC: a host address of its own network."""
    address = parse_ip(ip_field, ip)
    prefix = parse_netmask(mask_field, netmask)
    check_host(ip_field, address, network_of(address, prefix))
    return address, prefix


def check_gateway_reachable(field: str, gateway: Optional[str], addresses: Iterable[tuple[IPv4, int]]) -> str:
    """A gateway (``""`` for none) must be on the network of one of the NIC's addresses."""
    if gateway is None or gateway.strip() == "":
        return ""
    gw = parse_ip(field, gateway)
    networks = [network_of(ip, prefix) for ip, prefix in addresses]
    if networks and not any(gw in net for net in networks):
        raise ApiError(net_errors.OUTSIDE_NETWORK, field=field, value=str(gw), cidr=", ".join(map(str, networks)))
    return str(gw)
