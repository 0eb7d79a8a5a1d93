"""Error codes of the storage plugin (4001-4039; the agent's image transfer codes are 4040-4059)."""
from __future__ import annotations

from kvmdesk.core.errors import define
from kvmdesk.protocol.ranges import RANGE_NOT_SATISFIABLE  # noqa: F401  (4009: node agents answer it too)

UPLOAD_TOO_LARGE = define(
    4001, 413, "上传文件过大 (上限 {limit} 字节)", "the upload is too large (limit {limit} bytes)"
)
UPLOAD_INCOMPLETE = define(4002, 400, "上传不完整: {reason}", "the upload is incomplete: {reason}")
BAD_FORM = define(4003, 400, "表单数据错误: {reason}", "malformed form data: {reason}")
BAD_FILE_NAME = define(
    4004, 400, "文件名不合法 (不能包含路径): {name}", "invalid file name (it must not contain a path): {name}"
)
NOT_AN_IMAGE = define(
    4005, 400, "文件不是可用的磁盘镜像 (qcow2 或 raw): {reason}", "not a usable disk image (qcow2 or raw): {reason}"
)
NOT_AN_ISO = define(4006, 400, "文件不是ISO 9660光盘镜像", "not an ISO 9660 image")
NO_SPACE = define(
    4007, 507, "存储空间不足: 需要 {needed} 字节, 剩余 {free} 字节", "not enough storage: {needed} bytes needed, {free} free"
)
EMPTY_FILE = define(4008, 400, "上传的文件为空", "the uploaded file is empty")
NODE_NOT_IN_POOL = define(4010, 400, "节点不在该资源池中: {node}", "the node is not in this resource pool: {node}")
FILE_MISSING = define(4011, 410, "文件已不存在: {path}", "the file is gone: {path}")
IMAGE_CHECK_FAILED = define(4012, 500, "无法检查镜像格式: {reason}", "could not check the image format: {reason}")
NOT_MULTIPART = define(
    4013, 415, "上传需要 multipart/form-data 格式: {content_type}", "uploads need multipart/form-data: {content_type}"
)
