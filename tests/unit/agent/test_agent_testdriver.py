"""The test-driver node files, checked against libvirt itself."""
from __future__ import annotations

import libvirt
import pytest

from kvmdesk.agent.testdriver import (
    DomainSpec,
    domain_xml,
    node_file_of,
    node_file_uri,
    read_test_hostname,
    write_test_host,
)


def test_written_host_is_what_libvirt_loads(tmp_path):
    path = tmp_path / "host.xml"
    uri = write_test_host(
        path,
        hostname="node-<7>",
        cpus=6,
        memory_kib=2 * 1024 * 1024,
        domains=[DomainSpec("a", vcpus=3, state="running", uuid="7f7d3e2a-1111-4222-8333-944455556666"), {"name": "b"}],
    )
    assert uri == f"test://{path}"
    assert node_file_of(uri) == path
    assert read_test_hostname(path) == "node-<7>"

    conn = libvirt.open(uri)
    try:
        model, memory_mib, cpus, *_ = conn.getInfo()
        assert (model, memory_mib, cpus) == ("kvmdesk-test-cpu", 2048, 6)
        a = conn.lookupByName("a")
        assert a.UUIDString() == "7f7d3e2a-1111-4222-8333-944455556666"
        assert a.state()[0] == libvirt.VIR_DOMAIN_RUNNING and a.info()[3] == 3
        assert conn.lookupByName("b").state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        defined = conn.defineXML(domain_xml("c", vcpus=2, memory_kib=131072))
        assert defined.info()[1:4] == [131072, 131072, 2]
    finally:
        conn.close()


def test_helpers_reject_and_ignore_what_they_should(tmp_path):
    with pytest.raises(ValueError):
        DomainSpec("x", state="exploded")
    with pytest.raises(ValueError):
        write_test_host(tmp_path / "h.xml", hostname="a--b")
    assert node_file_of("test:///default") is None
    assert node_file_of("qemu:///system") is None
    assert node_file_uri("relative.xml").startswith("test:///")
    assert read_test_hostname(tmp_path / "missing.xml") is None
