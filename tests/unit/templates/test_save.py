"""#70 save: a new immutable version flattened on the host node and fetched by every other node of the
pool straight from the host's agent (a controller-signed ticket), identical (SHA-256 verified); run_date schedules it
(validated, replacing the pending one, surviving a restart); a node that missed it catches up."""
from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import pytest_twisted

from kvmdesk.core import errors as core_errors
from kvmdesk.core import scheduler
from kvmdesk.plugins.templates import errors, plugin, publish, schedule, schema
from templates_testlib import T, assert_error, restarted, started


def sha256(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def version_files(agent, template, version: int) -> list:
    root = agent.data_dir / "storage" / "instances" / "_template"
    return sorted(root / f"{d['uuid']}.v{version}" for d in template["devices"])


@pytest_twisted.ensureDeferred
async def test_save_publishes_a_version_to_every_node_of_the_pool(world):
    template = await world.create()
    ref = {"name": template["name"], "uuid": template["uuid"]}
    await world.act("start", template)
    status, body = await world.api.call("POST", T, {"action": "save", "param": ref})
    assert_error(status, body, 409, errors.TEMPLATE_STATE.code, "template1")
    await world.act("hard_stop", template)

    status, body = await world.api.call("POST", T, {"action": "save", "param": ref})
    assert status == 200, body
    assert body["data"]["version"] == 1
    assert {s["status"] for s in body["data"]["publish"].values()} == {0} and len(body["data"]["publish"]) == 2
    host = world.agent_of(template)
    (other,) = [a for a in world.agents if a is not host]
    for ours, theirs in zip(version_files(host, template, 1), version_files(other, template, 1)):
        assert ours.is_file() and theirs.is_file() and sha256(ours) == sha256(theirs)
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    assert stored["status"] == "inactive" and stored["version"] == 1
    # each version file is recorded with its SHA-256, as the nodes verified it
    assert {f["file_id"]: f["digest"] for f in stored["versions"][-1]["files"]} == {
        p.name: sha256(p) for p in version_files(host, template, 1)}
    status, body = await world.api.call("GET", f"{T}/image/", params={"pool_uuid": world.pool,
                                                                      "template_uuid": template["uuid"]})
    assert {s["status"] for r in body["data"]["results"] for s in r["storages"]} == {0}
    for node in world.nodes:  # the node's template images (#34) list the version too
        status, body = await world.api.call("GET", f"/resource_mgr/nodes/{node['uuid']}/template_images")
        (entry,) = [e for e in body["data"]["results"] if e["uuid"] == template["uuid"]]
        assert [(s["role"], s["version"], s["status"]) for s in entry["storages"]] == [(1, 1, 0), (2, 1, 0)]

    # a second save is version 2; deleting the template removes every version from every node
    status, body = await world.api.call("POST", T, {"action": "save", "param": ref})
    assert status == 200 and body["data"]["version"] == 2, body
    assert all(p.is_file() for p in version_files(other, template, 2))
    status, body = await world.api.call("DELETE", T, {"templates": [ref]})
    assert status == 200, body
    assert world.template_files() == [[], []]


@pytest_twisted.ensureDeferred
async def test_a_node_that_missed_a_version_catches_up(world):
    template = await world.create()
    host = next(n for n in world.nodes if n["uuid"] == template["host_uuid"])
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    nodes = world.core.store.collection("nodes")
    await nodes.update_one({"uuid": other["uuid"]}, {"$set": {"ip": "127.0.0.9"}})  # unreachable meanwhile
    status, body = await world.api.call("POST", T, {"action": "save", "param": {"name": "t", "uuid": template["uuid"]}})
    assert status == 200, body
    assert body["data"]["publish"][other["uuid"]]["status"] == publish.FAILED
    assert body["data"]["publish"][host["uuid"]]["status"] == publish.DONE
    await nodes.update_one({"uuid": other["uuid"]}, {"$set": {"ip": other["ip"]}})
    back = await nodes.find_one({"uuid": other["uuid"]})
    assert await publish.catch_up(world.core, back) == 1
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    assert stored["publish"][other["uuid"]]["status"] == publish.DONE
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    assert all(p.is_file() for p in version_files(agent, template, 1))
    assert await publish.catch_up(world.core, back) == 0  # nothing left to send


@pytest_twisted.ensureDeferred
async def test_a_node_back_online_gets_the_version_it_missed_through_the_status_hook(world):
    template = await world.create()
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    nodes = world.core.store.collection("nodes")
    await nodes.update_one({"uuid": other["uuid"]}, {"$set": {"ip": "127.0.0.9"}})  # unreachable meanwhile
    status, body = await world.api.call("POST", T, {"action": "save", "param": {"name": "t", "uuid": template["uuid"]}})
    assert body["data"]["publish"][other["uuid"]]["status"] == publish.FAILED, body
    await nodes.update_one({"uuid": other["uuid"]}, {"$set": {"ip": other["ip"]}})
    back = await nodes.find_one({"uuid": other["uuid"]})
    # what kvmdesk_node_status_changed runs: the watcher hands plugins the record without its secret
    await plugin.node_returned(world.core, {k: v for k, v in back.items() if k != "agent_secret"})
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    assert stored["publish"][other["uuid"]]["status"] == publish.DONE, stored["publish"]
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    assert all(p.is_file() for p in version_files(agent, template, 1))


@pytest_twisted.ensureDeferred
async def test_run_date_is_validated_replaced_and_survives_a_restart(world):
    clock = world.core.clock
    clock.advance(time.time())
    await world.api.login()  # the session would have expired on the jump to the present
    template = await world.create()
    ref = {"name": template["name"], "uuid": template["uuid"]}
    key = schema.save_key(template["uuid"])
    async with started(world.core):
        before = await world.snapshot()
        for run_date, code in [("2020-4-19 15:48:15", scheduler.RUN_DATE_PAST.code),
                               ("tomorrow", scheduler.RUN_DATE_INVALID.code),
                               ("2099-2-30 10:00:00", scheduler.RUN_DATE_INVALID.code)]:
            status, body = await world.api.call("POST", T, {"action": "save", "param": {**ref, "run_date": run_date}})
            assert_error(status, body, 400, code, "run_date")
            assert await world.snapshot() == before
            assert await world.core.scheduler.get(key) is None
        soon = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(clock.seconds() + 3600))
        later = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(clock.seconds() + 7200))
        for run_date in (later, soon):  # the second replaces the first
            status, body = await world.api.call("POST", T, {"action": "save", "param": {**ref, "run_date": run_date}})
            assert status == 200 and body["data"]["run_date"] == run_date, body
        (entry,) = await world.core.scheduler.list("template.save:")
        assert entry["key"] == key and abs(entry["next_time"] - (clock.seconds() + 3600)) < 2

    # a restarted controller (a new core over the same store) fires it at its time, as a save job
    async with restarted(world) as api:
        async with started(api.core):
            assert abs((await api.core.scheduler.get(key))["next_time"] - (clock.seconds() + 3600)) < 2
            clock.advance(3601)
            await api.core.scheduler.idle()
            (run,) = await api.core.scheduler.history(key)
            assert run["error"] is None and run["result"], run
            job = await api.core.jobs.wait(run["result"])
            assert job["kind"] == schedule.SAVE and job["state"] == "succeeded", job
            assert job["items"][0]["result"]["version"] == 1
            stored = await api.core.store.collection("templates").find_one({"uuid": template["uuid"]})
            assert stored["version"] == 1 and stored["versions"][-1]["job_id"] == job["uuid"]
            assert await api.core.scheduler.get(key) is None


@pytest_twisted.ensureDeferred
async def test_pending_saves_of_the_old_schedule_are_taken_over_once_at_start_up(world):
    clock = world.core.clock
    clock.advance(time.time())
    await world.api.login()
    template = await world.create()
    other = await world.create(name="template2")
    # what the per-template schedule of earlier releases kept: the pending save in the record
    at = clock.seconds() + 600
    await world.core.store.collection("templates").update_one(
        {"uuid": template["uuid"]}, {"$set": {"scheduled_save": {"at": at, "run_date": "then"}}})
    async with restarted(world) as api:
        (entry,) = await api.core.scheduler.list("template.save:")
        assert (entry["key"], entry["kind"], entry["next_time"]) == (schema.save_key(template["uuid"]), schedule.SAVE, at)
        assert entry["payload"] == {"uuid": template["uuid"]}
        for uuid in (template["uuid"], other["uuid"]):
            assert (await api.core.store.collection("templates").find_one({"uuid": uuid})).get("scheduled_save") is None
        assert await schedule.take_over_saved_schedules(api.core) == 0  # once


@pytest_twisted.ensureDeferred
async def test_download_streams_the_current_version_from_the_node(world):
    template = await world.create()
    ref = {"name": template["name"], "uuid": template["uuid"]}
    status, body = await world.api.call("POST", T, {"action": "download", "param": ref})
    assert_error(status, body, 409, errors.TEMPLATE_STATE.code, "save")
    await world.api.call("POST", T, {"action": "save", "param": ref})
    status, body = await world.api.call("POST", T, {"action": "download", "param": ref})
    assert status == 200, body
    answer = body["data"]
    assert answer["name"] == "template1.qcow2" and answer["version"] == 1
    status, content = await world.api.call("GET", answer["url"].removeprefix("/api/v1.0"))
    assert status == 200
    assert len(content) == answer["size"] and "sha256:" + hashlib.sha256(content).hexdigest() == answer["digest"]
    (system,) = [p for p in version_files(world.agent_of(template), template, 1) if p.name.startswith(
        template["devices"][0]["uuid"])]
    assert sha256(system) == answer["digest"]


async def saved_elsewhere(world, device: int) -> tuple[dict, dict, Any, str]:
    """A template saved once: ``(template, the other node, its version file of devices[device], digest)``."""
    template = await world.create()
    await world.api.call("POST", T, {"action": "save", "param": {"name": template["name"], "uuid": template["uuid"]}})
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    image = template["devices"][device]["uuid"]
    file = next(p for p in version_files(agent, template, 1) if p.name.startswith(image))
    return template, other, file, sha256(file)


@pytest_twisted.ensureDeferred
async def test_resync_sends_one_disk_version_to_one_node_again(world):
    template, other, lost, expected = await saved_elsewhere(world, 0)
    system = template["devices"][0]["uuid"]
    lost.unlink()
    param = {"ipaddr": other["ip"], "role": 1, "path": "/opt/slow", "image_id": system, "version": 1}
    for changes, status_code, code, word in [({"ipaddr": "10.9.9.9"}, 404, core_errors.NOT_FOUND.code, "10.9.9.9"),
                                             ({"image_id": "nope"}, 404, core_errors.NOT_FOUND.code, "nope"),
                                             ({"version": 7}, 400, core_errors.INVALID_PARAM.code, "version"),
                                             ({"role": 2}, 400, core_errors.INVALID_PARAM.code, "role")]:
        status, body = await world.api.call("POST", T, {"action": "resync", "param": {**param, **changes}})
        assert_error(status, body, status_code, code, word)
        assert not lost.exists()
    status, body = await world.api.call("POST", T, {"action": "resync", "param": param})
    assert status == 200 and body["data"]["status"] == 0, body
    assert sha256(lost) == expected


@pytest_twisted.ensureDeferred
async def test_a_version_sealed_with_md5_before_is_still_sent_and_verified_by_its_md5(world):
    """Records from before versions were sealed with SHA-256 hold ``md5`` (the controller's version files,
    the host agent's metadata): such a version is resent, verified by MD5, reported and downloadable."""
    template, other, lost, _ = await saved_elsewhere(world, 0)
    templates = world.core.store.collection("templates")
    stored = await templates.find_one({"uuid": template["uuid"]})
    host_agent = world.agent_of(template)
    old_files = []
    for f in stored["versions"][-1]["files"]:
        old_md5 = None
        for directory in (host_agent.data_dir / "storage" / "instances" / "_template", lost.parent):
            path = directory / f["file_id"]
            old_md5 = hashlib.md5(path.read_bytes()).hexdigest()
            old_meta = '{"md5": "%s", "size": %d, "version": 1}' % (old_md5, f["size"])
            path.with_name(f".{path.name}.json").write_text(old_meta)
        old_files.append({k: v for k, v in f.items() if k != "digest"} | {"md5": old_md5})
    versions = [{**stored["versions"][-1], "files": old_files}]
    await templates.update_one({"uuid": template["uuid"]}, {"$set": {"versions": versions}})
    system = old_files[0]
    assert system["device_uuid"] == template["devices"][0]["uuid"]

    lost.unlink()
    param = {"ipaddr": other["ip"], "role": 1, "image_id": system["device_uuid"], "version": 1}
    status, body = await world.api.call("POST", T, {"action": "resync", "param": param})
    assert status == 200 and body["data"]["status"] == 0, body
    assert hashlib.md5(lost.read_bytes()).hexdigest() == system["md5"]
    assert f'"digest":"md5:{system["md5"]}"' in lost.with_name(f".{lost.name}.json").read_text()
    node = await world.core.store.collection("nodes").find_one({"uuid": other["uuid"]})
    assert await publish.progress_of(world.core, node, old_files) == {f["device_uuid"]: 100 for f in old_files}
    status, body = await world.api.call("POST", T, {"action": "download", "param": {"name": template["name"],
                                                                                    "uuid": template["uuid"]}})
    assert status == 200 and body["data"]["digest"] == f"md5:{system['md5']}", body

    # a copy on the node that does not match its MD5 is refused, naming the digest
    lost.unlink()
    lost.with_name(f".{lost.name}.json").unlink()
    wrong = [{**system, "md5": "0" * 32}]
    result = await publish.send_to(world.core, stored, await world.core.store.collection("nodes").find_one(
        {"uuid": template["host_uuid"]}), node, wrong, 1)
    assert result["status"] == publish.FAILED and "md5:" + "0" * 32 in result["error"], result
    assert not lost.exists()


@pytest_twisted.ensureDeferred
async def test_a_version_listed_among_a_nodes_template_images_is_resent_from_there(world):
    """#34's resync (``/resource_mgr/nodes/{node}/template_images/{image}/resync``) of what #34 lists."""
    template, other, lost, expected = await saved_elsewhere(world, 1)
    data = template["devices"][1]["uuid"]
    path = f"/resource_mgr/nodes/{other['uuid']}/template_images/{data}/resync"
    status, body = await world.api.call("GET", f"/resource_mgr/nodes/{other['uuid']}/template_images")
    (entry,) = [e for e in body["data"]["results"] if e["uuid"] == template["uuid"]]
    assert data in {s["image_id"] for s in entry["storages"]}
    for shape in ({"action": "resync", "param": {"role": 2, "image_id": data, "path": "/opt/slow", "version": 1}},
                  {"data": {"ipaddr": other["ip"], "role": 2, "path": "/opt/slow", "image_id": data, "version": 1}}):
        lost.unlink()
        status, body = await world.api.call("POST", path, shape)
        assert status == 200 and body["data"]["status"] == 0, body
        assert sha256(lost) == expected
    for shape, status_code, code, word in [
            ({"role": 1}, 400, core_errors.INVALID_PARAM.code, "role"),
            ({"version": 9}, 400, core_errors.INVALID_PARAM.code, "version")]:
        status, body = await world.api.call("POST", path, shape, headers={"Accept-Language": "en"})
        assert_error(status, body, status_code, code, word)


@pytest_twisted.ensureDeferred
async def test_a_save_interrupted_by_a_restart_leaves_nothing_updating_and_its_job_resumes(world):
    template = await world.create()
    ref = {"name": template["name"], "uuid": template["uuid"]}
    host = world.agent_of(template)
    (other,) = [a for a in world.agents if a is not host]
    # the controller stops as a save job begins: the job is left running, its item not done ...
    await world.core.jobs.stopService()
    record = await world.core.jobs.submit(schedule.SAVE, title="save template1", items=[ref])
    left = await world.core.jobs.wait(record["uuid"])
    assert (left["state"], left["items"][0]["state"]) == ("running", "pending")
    # ... and what a controller that died mid-save leaves: the template updating, a version file half made
    await world.core.store.collection("templates").update_one({"uuid": template["uuid"]},
                                                              {"$set": {"status": "updating"}})
    leftover = host.data_dir / "storage" / "instances" / "_template" / f"{template['devices'][0]['uuid']}.v1"
    leftover.write_bytes(b"half a version")

    async with restarted(world) as api:
        templates = api.core.store.collection("templates")
        stored = await templates.find_one({"uuid": template["uuid"]})  # usable again at start-up, with the reason
        assert stored["status"] == "inactive" and "controller stopped" in stored["save_error"]
        async with started(api.core):
            await api.core.jobs.recovered
            final = await api.core.jobs.wait(record["uuid"])
        assert (final["state"], final["resumed"], final["success_num"]) == ("succeeded", 1, 1), final
        assert final["items"][0]["result"]["version"] == 1
        status, body = await api.call("GET", f"/jobs/{record['uuid']}")
        assert status == 200 and body["data"]["state"] == "succeeded", body
        stored = await templates.find_one({"uuid": template["uuid"]})
        assert (stored["status"], stored["version"], stored["save_error"]) == ("inactive", 1, None)
        assert stored["versions"][-1]["job_id"] == record["uuid"]
        assert leftover.read_bytes()[:4] == b"QFI\xfb"  # a real qcow2 now
        for ours, theirs in zip(version_files(host, template, 1), version_files(other, template, 1)):
            assert sha256(ours) == sha256(theirs)

        # a save job resumed once its version was stored (the restart came just after) makes no second one
        await api.core.jobs.collection.update_one({"uuid": record["uuid"]}, {"$set": {
            "state": "running", "items": [{**ref, "state": "pending", "code": None, "msg": None}]}})
        async with started(api.core):
            await api.core.jobs.recovered
            again = await api.core.jobs.wait(record["uuid"])
        assert (again["state"], again["items"][0]["result"]["version"]) == ("succeeded", 1), again
        assert (await templates.find_one({"uuid": template["uuid"]}))["version"] == 1
        assert not any(p.exists() for p in version_files(host, template, 2))


@pytest_twisted.ensureDeferred
async def test_publish_progress_is_asked_of_each_node_per_disk(world):
    template = await world.create()
    await world.api.call("POST", T, {"action": "save", "param": {"name": "t", "uuid": template["uuid"]}})
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    files = stored["versions"][-1]["files"]
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    node = await world.core.store.collection("nodes").find_one({"uuid": other["uuid"]})
    assert await publish.progress_of(world.core, node, files) == {f["device_uuid"]: 100 for f in files}
    # half of the system disk's version received: a partial file of that content
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    system = files[0]
    final = agent.data_dir / "storage" / "instances" / "_template" / system["file_id"]
    half = final.read_bytes()[: system["size"] // 2]
    final.unlink()
    (final.parent / f".{final.name}.part").write_bytes(half)
    (final.parent / f".{final.name}.part.json").write_text(
        '{"digest": "%s", "total": %d, "version": 1}' % (system["digest"], system["size"]))
    progress = await publish.progress_of(world.core, node, files)
    assert progress[system["device_uuid"]] == 50 and progress[files[1]["device_uuid"]] == 100

    # the report keeps it in the template while it is updating
    await world.core.store.collection("templates").update_one({"uuid": template["uuid"]},
                                                              {"$set": {"status": "updating"}})
    host = await world.core.store.collection("nodes").find_one({"uuid": template["host_uuid"]})
    heard = []
    report = publish.ProgressReport(world.core, stored, host, [node], files, 1, heard.append)
    await report.report()
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    assert stored["publish"][other["uuid"]]["status"] == publish.SYNCING
    assert stored["publish"][other["uuid"]]["progress"][system["device_uuid"]] == 50
    # the whole, by bytes: half the system disk's, all of the data disk's (the save job's progress)
    sizes = [f["size"] for f in files]
    assert heard == [pytest.approx(100 * (sizes[0] // 2 / sizes[0] * sizes[0] + sizes[1]) / sum(sizes), abs=1)]


def test_overall_progress_weighs_each_disk_by_its_size_over_every_target():
    files = [{"device_uuid": "a", "size": 300}, {"device_uuid": "b", "size": 100}]
    assert publish.overall_progress(files, [{"a": 100, "b": 0}, {"a": 0, "b": 0}]) == 37.5
    assert publish.overall_progress(files, [{"a": 50, "b": 100}]) == 62.5
    assert publish.overall_progress(files, [{}, {"a": 100, "b": 100}]) == 50.0  # a node that did not answer: 0
    assert publish.overall_progress(files, []) == 100.0  # no other node: nothing to fetch


@pytest_twisted.ensureDeferred
async def test_a_fetch_resumes_from_the_partial_file_and_verifies_the_whole(world):
    template = await world.create()
    await world.api.call("POST", T, {"action": "save", "param": {"name": "t", "uuid": template["uuid"]}})
    stored = await world.core.store.collection("templates").find_one({"uuid": template["uuid"]})
    system = stored["versions"][-1]["files"][0]
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    agent = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])]
    final = agent.data_dir / "storage" / "instances" / "_template" / system["file_id"]
    good = final.read_bytes()
    final.unlink()
    # a partial file of that content whose bytes were damaged: only a resume would use them
    (final.parent / f".{final.name}.part").write_bytes(b"\xff" * (system["size"] // 2))
    (final.parent / f".{final.name}.part.json").write_text(
        '{"digest": "%s", "total": %d, "version": 1}' % (system["digest"], system["size"]))
    param = {"ipaddr": other["ip"], "role": 1, "image_id": system["device_uuid"], "version": 1}
    status, body = await world.api.call("POST", T, {"action": "resync", "param": param},
                                        headers={"Accept-Language": "en"})
    assert status == 502 and body["code"] == errors.SEND_FAILED.code and system["digest"] in body["msg"], body  # resumed, then refused whole: checksum
    assert not final.exists()
    status, body = await world.api.call("POST", T, {"action": "resync", "param": param})
    assert status == 200, body  # the damaged partial was dropped: fetched from the start
    assert final.read_bytes() == good


@pytest_twisted.ensureDeferred
async def test_a_version_fetched_while_its_source_hashes_it_is_verified_and_a_damaged_copy_refetched(world):
    """The save's nodes fetch a version before the host knows its digest (they hash what they receive);
    the check with the digest then catches a copy that arrived damaged, drops it and fetches it whole."""
    created = await world.create()
    template = await world.core.store.collection("templates").find_one({"uuid": created["uuid"]})
    device = template["devices"][0]
    host = await world.core.store.collection("nodes").find_one({"uuid": template["host_uuid"]})
    other = next(n for n in world.nodes if n["uuid"] != template["host_uuid"])
    node = await world.core.store.collection("nodes").find_one({"uuid": other["uuid"]})
    agents = world.core.extensions["agents"]
    name = publish.version_file(device["file_id"], 7)
    made = await agents.call(host, "POST", f"/disks/template/{device['file_id']}/copy", {
        "role": 1, "version": 7, "seal_later": True, "to": {"kind": "template", "role": 1, "file_id": name}})
    assert made["digest"] is None  # answered before the hash
    sealed = await agents.call(host, "POST", f"/disks/template/{name}/seal", params={"role": 1})
    source = world.agent_of(template).data_dir / "storage" / "instances" / "_template" / name
    assert sealed == {"digest": sha256(source), "size": source.stat().st_size, "version": 7}
    good = source.read_bytes()

    # the bytes arrive damaged: the unsealed fetch keeps them (it cannot know yet)
    source.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    files = [{"device_uuid": device["uuid"], "role": 1, "file_id": name, "digest": None, "size": len(good)}]
    received = await publish.send_to(world.core, template, host, node, files, 7)
    assert received["status"] == publish.DONE
    source.write_bytes(good)
    target = world.agents[[n["uuid"] for n in world.nodes].index(other["uuid"])].data_dir / "storage" / \
        "instances" / "_template" / name
    assert not target.exists() and (target.parent / f".{name}.part").is_file()

    # with the digest the node checks what it holds, refuses it, and the second try fetches it whole
    files[0]["digest"] = sealed["digest"]
    result = await publish.verify_on(world.core, template, host, node, files, 7, received)
    assert result == {"version": 7, "status": publish.DONE, "error": None}
    assert target.read_bytes() == good and not (target.parent / f".{name}.part").exists()
