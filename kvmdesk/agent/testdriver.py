"""Node definition files for libvirt's ``test`` driver (``test:///abs/path/host.xml``).

The test driver keeps all its state in memory and loads it from such a file on every connection
open, so each test (or each demo agent) gets a private fake hypervisor by writing its own file.

The driver always reports the real machine's hostname (``virConnectGetHostname`` is not part of the
node file), so the host name a file was written for is kept in a comment and read back with
:func:`read_test_hostname`.
"""
from __future__ import annotations

import os
import re
import uuid as uuidlib
from pathlib import Path
from typing import Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

import attrs

#: Namespace of the test driver's private domain elements (``<test:runstate>``).
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

#: libvirt ``virDomainState`` numbers for the states a test domain can start in.
RUNSTATES = {"running": 1, "paused": 3, "shutoff": 5}

_HOSTNAME_COMMENT = re.compile(r"<!-- kvmdesk-hostname: (.*?) -->")


@attrs.frozen
class DomainSpec:
    """A domain preloaded into a test host.

    :param name: domain name.
    :param vcpus: virtual CPUs.
    :param memory_kib: memory in KiB.
    :param state: ``running``, ``paused`` or ``shutoff``.
    :param uuid: fixed UUID; a random one when omitted.
    :param vnc_port: a VNC display on ``127.0.0.1:vnc_port`` (the test driver runs nothing there: a
        test's own VNC server can listen on it, see :mod:`kvmdesk.testing.vnc`).
    :param vnc_password: that display's password.
    """

    name: str
    vcpus: int = 1
    memory_kib: int = 524288
    state: str = attrs.field(default="shutoff", validator=attrs.validators.in_(RUNSTATES))
    uuid: str = attrs.field(factory=lambda: str(uuidlib.uuid4()))
    vnc_port: int | None = None
    vnc_password: str | None = None


def domain_xml(name: str, *, vcpus: int = 1, memory_kib: int = 524288, uuid: str | None = None) -> str:
    """A minimal domain definition the test driver accepts (for ``defineXML``).

    :returns: the XML text.
    """
    uuid_line = f"  <uuid>{escape(uuid)}</uuid>\n" if uuid else ""
    return (
        "<domain type='test'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"{uuid_line}"
        f"  <memory unit='KiB'>{int(memory_kib)}</memory>\n"
        f"  <vcpu>{int(vcpus)}</vcpu>\n"
        "  <os><type>hvm</type></os>\n"
        "</domain>\n"
    )


def _graphics(domain: DomainSpec) -> str:
    if domain.vnc_port is None:
        return ""
    password = f" passwd={quoteattr(domain.vnc_password)}" if domain.vnc_password else ""
    return (f"    <devices><graphics type='vnc' port='{int(domain.vnc_port)}' autoport='no' listen='127.0.0.1'"
            f"{password}/></devices>\n")


def _preloaded_domain(domain: DomainSpec) -> str:
    return (
        f"  <domain type='test' xmlns:test='{TEST_NS}'>\n"
        f"    <name>{escape(domain.name)}</name>\n"
        f"    <uuid>{escape(domain.uuid)}</uuid>\n"
        f"    <memory unit='KiB'>{int(domain.memory_kib)}</memory>\n"
        f"    <vcpu>{int(domain.vcpus)}</vcpu>\n"
        "    <os><type>hvm</type></os>\n"
        f"{_graphics(domain)}"
        f"    <test:runstate>{RUNSTATES[domain.state]}</test:runstate>\n"
        "  </domain>\n"
    )


def _as_domain(spec: DomainSpec | Mapping) -> DomainSpec:
    return spec if isinstance(spec, DomainSpec) else DomainSpec(**spec)


def write_test_host(
    path: str | os.PathLike,
    hostname: str = "kvmdesk-test",
    cpus: int = 4,
    memory_kib: int = 4 * 1024 * 1024,
    domains: Iterable[DomainSpec | Mapping] = (),
    cpu_model: str = "kvmdesk-test-cpu",
    mhz: int = 2000,
) -> str:
    """Write a test-driver node file and return its connection URI.

    :param path: where to write; must be absolute for the URI to work, so it is made absolute.
    :param hostname: recorded for :func:`read_test_hostname` (libvirt cannot report it).
    :param cpus: logical CPUs of the fake node (one socket, one thread per core).
    :param memory_kib: node memory in KiB.
    :param domains: preloaded domains, :class:`DomainSpec` or dicts of its fields.
    :param cpu_model: the model ``getInfo()`` reports.
    :param mhz: the CPU frequency ``getInfo()`` reports.
    :returns: ``test:///abs/path``.
    """
    target = Path(path).absolute()
    if "--" in hostname:
        raise ValueError("hostname must not contain '--' (it is kept in an XML comment)")
    body = "".join(_preloaded_domain(_as_domain(spec)) for spec in domains)
    text = (
        "<node>\n"
        f"  <!-- kvmdesk-hostname: {escape(hostname)} -->\n"
        "  <cpu>\n"
        f"    <mhz>{int(mhz)}</mhz>\n"
        f"    <model>{escape(cpu_model)}</model>\n"
        f"    <active>{int(cpus)}</active>\n"
        "    <nodes>1</nodes>\n"
        "    <sockets>1</sockets>\n"
        f"    <cores>{int(cpus)}</cores>\n"
        "    <threads>1</threads>\n"
        "  </cpu>\n"
        f"  <memory>{int(memory_kib)}</memory>\n"
        f"{body}"
        "</node>\n"
    )
    target.write_text(text, encoding="utf-8")
    return node_file_uri(target)


def node_file_uri(path: str | os.PathLike) -> str:
    """The ``test:///abs/path`` URI for a node file."""
    return "test://" + str(Path(path).absolute())


def node_file_of(uri: str) -> Path | None:
    """The node file behind a ``test:///abs/path`` URI, or ``None`` for any other URI
    (including ``test:///default``, which is built into libvirt)."""
    if not uri.startswith("test:///") or uri == "test:///default":
        return None
    return Path(uri[len("test://"):])


def read_test_hostname(path: str | os.PathLike) -> str | None:
    """The hostname :func:`write_test_host` recorded, or ``None`` when absent or unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    match = _HOSTNAME_COMMENT.search(text)
    if match is None:
        return None
    return match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
