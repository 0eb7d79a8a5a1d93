"""The image transfer protocol between the controller's storage plugin and a node agent.

Shared by both sides (the controller interprets the agent's error codes).  Paths are relative to the
agent's API prefix (``/agent/v1``):

``GET /images/{kind}/{file_id}?role=R&digest=D``
    State of one image file: ``{"exists", "size", "digest", "path", "partial"}``; ``partial`` is how many
    bytes of an interrupted transfer of the content with digest ``D`` the agent already holds (resume
    from there), 0 if none.
``PUT /images/{kind}/{file_id}?role=R&offset=N&total=T&digest=D`` (body: bytes N..T-1, streamed)
    Appends to the partial file, which must hold exactly N bytes (else :data:`OFFSET_MISMATCH` with
    ``data={"partial": n}``); once T bytes are in, the digest of the whole file is checked and only then
    is the file renamed into place: ``{"path", "size", "digest"}``.  A connection lost midway keeps the
    partial file for the next attempt.
``DELETE /images/{kind}/{file_id}?role=R``
    Removes the file and any partial transfer of it: ``{"removed": bool}``.
``GET /images/{kind}?role=R``
    The complete files of a kind in a role's storage: ``[{"file_id", "size", "digest", "version", "path"}]``.

``kind`` is ``base`` (base images, under ``instances/_base`` of the role's storage directory) or
``template`` (template disk images, under ``instances/_template``).  ``role`` is a contract storage
role: 1 template system disks, 2 template data disks, 3 desktop system disks, 4 desktop data disks.

A *digest* names its algorithm: ``sha256:<64 hex>`` or ``md5:<32 hex>`` (:data:`DIGEST`).  Template
versions are sealed with SHA-256 (:data:`VERSION_ALGORITHM`: stronger than MD5, and 2.3x faster on CPUs
with SHA extensions, which decides how fast a version is published); base images and ISOs keep MD5,
the checksum the API exposes for them (``md5_sum``).  Versions sealed with MD5 before stay verifiable.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

from kvmdesk.core.errors import define
from kvmdesk.protocol.storage import STORAGE_ROLES, hash_file

#: ``instance`` (desktops' disks) and ``iso`` (CD-ROM media placed on the node) are the domain layer's.
KINDS = {"base": "instances/_base", "template": "instances/_template", "instance": "instances/_instance",
         "iso": "instances/_iso"}
#: The ``role`` query parameter: a contract role number to its key in ``[agent.storage]``.
ROLES = {number: role for role, number in STORAGE_ROLES.items()}
#: File ids are server-chosen (uuids, optionally with a version suffix); anything else is refused.
FILE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^(?:md5:[0-9a-f]{32}|sha256:[0-9a-f]{64})$")
#: How template versions are sealed (and hashed by a node while the host still seals one).
VERSION_ALGORITHM = "sha256"

UNKNOWN_KIND = define(4040, 400, "未知的镜像类型: {kind}", "unknown image kind: {kind}")
BAD_FILE_ID = define(4041, 400, "镜像文件标识不合法: {file_id}", "invalid image file id: {file_id}")
OFFSET_MISMATCH = define(
    4042, 409, "续传位置不一致: 请求 {offset}, 已有 {partial} 字节",
    "resume offset mismatch: asked for {offset}, {partial} bytes are here",
)
DIGEST_MISMATCH = define(
    4043, 422, "镜像校验失败: 期望 {expected}, 实际 {actual}", "image checksum mismatch: expected {expected}, got {actual}"
)
TRANSFER_INCOMPLETE = define(
    4044, 400, "传输不完整: 收到 {received} / {total} 字节", "incomplete transfer: {received} of {total} bytes"
)
BAD_TRANSFER = define(4045, 400, "传输参数错误: {reason}", "invalid transfer parameters: {reason}")
IMAGE_NOT_FOUND = define(4046, 404, "节点上没有该镜像: {file_id}", "no such image on this node: {file_id}")
STORAGE_FULL = define(
    4047, 507, "节点存储空间不足: 需要 {needed} 字节, 剩余 {free} 字节", "not enough space on the node: {needed} bytes needed, {free} free"
)
WRITE_FAILED = define(4048, 500, "写入镜像失败: {reason}", "writing the image failed: {reason}")


def digest_of(algorithm: str, hexdigest: str) -> str:
    """``algorithm:hexdigest``, the form every digest takes on the wire and in records."""
    return f"{algorithm}:{hexdigest}"


def algorithm_of(digest: str) -> str:
    """The algorithm a (valid) digest names."""
    return digest.partition(":")[0]


def version_digest(path: Path) -> str:
    """The digest a template version file is sealed with (``sha256:<hex>``).  Blocking: run in a thread."""
    return digest_of(VERSION_ALGORITHM, hash_file(path, VERSION_ALGORITHM).hexdigest())


def recorded_digest(record: Mapping[str, Any]) -> Optional[str]:
    """The digest a record holds: its ``digest``, or ``md5:<md5>`` for one written before digests named
    their algorithm (a node's image metadata, a template version): such a file stays verifiable by MD5."""
    if record.get("digest"):
        return record["digest"]
    return digest_of("md5", record["md5"]) if record.get("md5") else None
