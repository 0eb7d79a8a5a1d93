"""IP address allocation from the subnets of data networks: a core service for other plugins.

Other plugins (templates, desktop groups) reach it as ``core.extensions["ipam"]``::

    ipam = core.extensions["ipam"]
    allocation = await ipam.allocate(subnet_uuid, owner=f"desktop:{uuid}")          # next free address
    allocation = await ipam.allocate(subnet_uuid, "172.16.1.20", owner="template:...") # that address
    await ipam.release(subnet_uuid, allocation["ip"])

How it stays correct under concurrency and restarts: every allocation is a document of
``ip_allocations`` under the store's unique compound index ``(subnet_uuid, ip)``, so the insert itself
is the atomic claim: two requests can never both hold one address, whichever controller process
they run in.  To keep concurrent requests from all trying the same address first, each takes a
distinct starting point from a per-subnet counter advanced with ``find_one_and_update`` (``$inc``);
a request whose candidate was taken meanwhile scans for the first free address after it and tries
again.  A subnet is full when it holds as many allocations as its range has addresses.  Everything
lives in the store: a restarted controller sees every allocation that was made.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from kvmdesk.core import errors
from kvmdesk.core.errors import ApiError, Resource
from kvmdesk.core.records import new_record
from kvmdesk.core.store import DuplicateKeyError
from kvmdesk.plugins.network import addressing, schema
from kvmdesk.plugins.network import errors as net_errors

EXTENSION = "ipam"
SUBNET = Resource("子网", "subnet")


class IPAM:
    """Allocate and release addresses of subnets.

    :param core: the running core (its store and clock).
    """

    def __init__(self, core: Any):
        self.core = core

    @property
    def _allocations(self) -> Any:
        return self.core.store.collection(schema.ALLOCATIONS)

    async def _subnet(self, subnet_uuid: str) -> tuple[dict, addressing.SubnetSpec]:
        subnet = await self.core.store.collection(schema.SUBNETS).find_one({"uuid": subnet_uuid})
        if subnet is None:
            raise ApiError(errors.NOT_FOUND, resource=SUBNET, key=subnet_uuid)
        return subnet, addressing.spec_of_record(subnet)

    def _record(self, subnet: dict, ip: ipaddress.IPv4Address, owner: str) -> dict:
        return new_record(self.core.clock, subnet_uuid=subnet["uuid"], network_uuid=subnet["network_uuid"], ip=str(ip),
                          owner=owner)

    async def allocate(self, subnet_uuid: str, ip: Optional[str] = None, *, owner: str = "") -> dict:
        """Hand out ``ip``, or the next free address of the subnet's range when ``ip`` is ``None``.

        :param owner: who holds it (``"desktop:<uuid>"``...), for :meth:`release_owner` and for humans.
        :returns: the allocation record (``uuid, subnet_uuid, network_uuid, ip, owner``...).
        :raises ApiError: no such subnet (404), ``ip`` invalid (400) or outside the range (400), ``ip``
            already allocated (409), or no free address left (409).
        """
        subnet, spec = await self._subnet(subnet_uuid)
        if ip is not None:
            return await self._claim_specific(subnet, spec, addressing.parse_ip("ip", ip), owner)
        return await self._claim_next(subnet, spec, owner)

    async def _claim_specific(self, subnet: dict, spec: addressing.SubnetSpec, address: ipaddress.IPv4Address,
                              owner: str) -> dict:
        if not spec.contains(address):
            raise ApiError(net_errors.OUTSIDE_RANGE, ip=str(address), name=subnet["name"], start_ip=str(spec.start),
                           end_ip=str(spec.end))
        try:
            return await self._allocations.insert_one(self._record(subnet, address, owner))
        except DuplicateKeyError:
            raise ApiError(net_errors.ADDRESS_TAKEN, ip=str(address), name=subnet["name"]) from None

    async def _claim_next(self, subnet: dict, spec: addressing.SubnetSpec, owner: str) -> dict:
        exhausted = ApiError(net_errors.ADDRESS_EXHAUSTED, name=subnet["name"], size=spec.size)
        cursor = await self._advance_cursor(subnet["uuid"])
        candidate: Optional[int] = (cursor["next"] - 1) % spec.size
        # Each failed claim means another request claimed that address meanwhile, so this loop
        # ends; the bound only guards against a store that misbehaves.
        for _ in range(spec.size + 64):
            if candidate is None:
                raise exhausted
            address = spec.start + candidate
            try:
                return await self._allocations.insert_one(self._record(subnet, address, owner))
            except DuplicateKeyError:
                candidate = await self._first_free_after(subnet, spec, candidate)
        raise exhausted

    async def _advance_cursor(self, subnet_uuid: str) -> dict:
        cursors = self.core.store.collection(schema.CURSORS)
        try:
            return await cursors.find_one_and_update({"subnet_uuid": subnet_uuid}, {"$inc": {"next": 1}}, upsert=True)
        except DuplicateKeyError:
            # MongoDB: two first upserts raced and one lost the insert; the cursor exists now
            return await cursors.find_one_and_update({"subnet_uuid": subnet_uuid}, {"$inc": {"next": 1}})

    async def _first_free_after(self, subnet: dict, spec: addressing.SubnetSpec, offset: int) -> Optional[int]:
        """The first offset after ``offset`` (wrapping) that is not allocated, or ``None`` if full."""
        taken = {int(ipaddress.IPv4Address(a["ip"])) - int(spec.start)
                 for a in await self._allocations.find({"subnet_uuid": subnet["uuid"]}, projection=["ip"])}
        if len(taken) >= spec.size:
            return None
        for step in range(1, spec.size + 1):
            candidate = (offset + step) % spec.size
            if candidate not in taken:
                return candidate
        return None

    async def release(self, subnet_uuid: str, ip: str) -> bool:
        """Give an address back; ``False`` if it was not allocated."""
        return bool(await self._allocations.delete_one({"subnet_uuid": subnet_uuid, "ip": str(addressing.parse_ip("ip", ip))}))

    async def release_owner(self, owner: str) -> int:
        """Give back every address ``owner`` holds; returns how many."""
        return await self._allocations.delete_many({"owner": owner})

    async def allocations(self, subnet_uuid: str) -> list[dict]:
        """The allocations of a subnet, oldest first."""
        return await self._allocations.find({"subnet_uuid": subnet_uuid}, sort=[("id", 1)])
