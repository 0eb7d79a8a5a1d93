#!/usr/bin/env python3
"""Teaching desktops at classroom scale: a 500-desktop group created over 5 agents and started.

    .venv/bin/python bench/provision_bench.py [--desktops 500] [--agents 5] [--workdir DIR]

What runs, all on this machine (loopback):

- ``--agents`` node agents as ``twistd kvmdesk-agent`` processes (127.0.0.2..., libvirt's test driver),
  enrolled by a controller running in this process (the real plugins, a SQLite store), through
  :func:`kvmdesk.testing.agents.agent_testbed`;
- a small base image, a template made from it and saved (its version published to every node), a data
  network whose subnet has room for every desktop, a teaching group;
- one desktop group of ``--desktops`` desktops with ``sys_restore``, spread evenly (``create_info``),
  created through the API (every desktop: a qcow2 overlay on the template version and a domain
  defined on its node), then started through the API (each start admitted by its node's boot-storm
  limit, its overlay made fresh, the domain started).

Printed: desktops/s created and started (wall clock of each request), the controller's CPU (this
process) as a share of one core during each, and per node the peak of concurrent starts against the
admission limit in force at that moment.  Targets (issue 16): >= 10 desktops/s controller-side on the
test driver, no node above its limit, the group created in < 60 s.  Asserts nothing.

The agents run on one machine and one disk here, so ``qemu-img`` of all of them share its cores: the
figures are those of this host, not of five.  The real-KVM figure (linked clones per second on
qemu:///system) is not measured by this script.
"""
from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

T = "/education/template"


def make_image(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path


def subnet_for(count: int) -> dict:
    """A subnet with room for ``count`` desktops (and the template)."""
    prefix = 32 - max(8, (count + 64).bit_length())
    network = ipaddress.IPv4Network(f"10.64.0.0/{prefix}")
    first, last = network.network_address + 10, network.broadcast_address - 2
    return {"name": "s", "start_ip": str(first), "end_ip": str(last), "netmask": str(network.netmask),
            "gateway": str(network.broadcast_address - 1), "dns1": "10.64.0.1"}


async def ok(api, method: str, path: str, body=None):
    status, answer = await api.call(method, path, body)
    if status != 200 or answer.get("code") != 0:
        raise SystemExit(f"{method} {path}: {status} {answer}")
    return answer["data"]


async def run(args: argparse.Namespace, workdir: Path) -> None:
    import psutil

    from kvmdesk.testing.agents import agent_testbed

    # Every node is this host: let it take the whole class (the figures are about speed, not capacity).
    config = {"desktops": {"cpu_overcommit": 1000.0, "ram_overcommit": 100.0, "disk_per_desktop_gib": 0.01}}
    async with agent_testbed(workdir, args.agents, config=config) as bed:
        api, core, pool, ips = bed.api, bed.api.core, bed.pool, bed.ips
        image = await bed.distributed_image(make_image(workdir / "base.qcow2"))
        network, subnet = await bed.data_network(subnet_for(args.desktops))
        template = await ok(api, "POST", T, {"action": "create", "param": {
            "name": "tpl", "os_type": "Linux", "classify": 1, "pool_uuid": pool, "network_uuid": network["uuid"],
            "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 1, "system_disk": {"image_id": image["uuid"], "size": 20},
            "data_disks": []}})
        await ok(api, "POST", T, {"action": "save", "param": {"name": "tpl", "uuid": template["uuid"]}})
        teaching = await ok(api, "POST", "/education/group", {
            "name": "class", "group_type": 1, "desc": "", "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"],
            "start_ip": "192.168.200.10", "end_ip": "192.168.200.250"})
        share, extra = divmod(args.desktops, len(ips))
        create_info = {ip: share + (1 if i < extra else 0) for i, ip in enumerate(ips)}
        me = psutil.Process()

        def measured():
            return time.perf_counter(), sum(me.cpu_times()[:2])

        wall, cpu = measured()
        group = await ok(api, "POST", "/education/desktop", {"action": "create", "param": {
            "name": "lab", "group_uuid": teaching["uuid"], "template_uuid": template["uuid"], "pool_uuid": pool,
            "network_uuid": network["uuid"], "subnet_uuid": subnet["uuid"], "vcpu": 1, "ram": 0.125,
            "sys_restore": 1, "data_restore": 0, "instance_num": args.desktops, "prefix": "pc", "postfix": 4,
            "postfix_start": 1, "create_info": create_info}})
        wall2, cpu2 = measured()
        created_s, created_cpu = wall2 - wall, cpu2 - cpu
        ref = {"desktops": [{"uuid": group["uuid"], "name": "lab"}]}
        await ok(api, "POST", "/education/desktop", {"action": "start", "param": ref})
        wall3, cpu3 = measured()
        started_s, started_cpu = wall3 - wall2, cpu3 - cpu2
        (shown,) = (await ok(api, "GET", "/education/desktop"))["results"]
        print(f"desktops: {args.desktops} over {len(ips)} agents (test driver), {shown['active_count']} running")
        print(f"created in {created_s:.1f} s: {args.desktops / created_s:.1f} desktops/s "
              f"(targets: >= 10/s, group < 60 s); controller CPU {100 * created_cpu / created_s:.0f}% of one core")
        print(f"started in {started_s:.1f} s: {args.desktops / started_s:.1f} desktops/s (target >= 10/s); "
              f"controller CPU {100 * started_cpu / started_s:.0f}% of one core")
        figures = core.extensions["start_admission"].figures()
        nodes = {n["uuid"]: n["ip"] for n in await core.store.collection("nodes").find({})}
        over = 0
        for node, f in sorted(figures.items(), key=lambda kv: nodes.get(kv[0], "")):
            over += f["worst_excess"] > 0
            print(f"  node {nodes.get(node, node)}: peak {f['peak']} concurrent starts, limit {f['limit_at_peak']} "
                  f"then; admitted {f['admitted']}, waited {f['waited']}, timed out {f['timed_out']}")
        print(f"nodes above their admission limit: {over} (target 0)")
        await ok(api, "DELETE", "/education/desktop", ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--desktops", type=int, default=500)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="provision-bench-", dir=args.workdir))
    try:
        task.react(lambda reactor: defer.ensureDeferred(run(args, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
