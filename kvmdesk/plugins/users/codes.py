"""Error codes of the users plugin (7000-7999), with their HTTP status and zh-CN/en messages."""
from __future__ import annotations

from kvmdesk.core.errors import define

GROUP_HAS_USERS = define(
    7001, 409, "用户分组 {name} 中还有 {count} 个用户, 请先删除或移走这些用户",
    "user group {name} still has {count} users: delete or move them first",
)
GROUP_NAME_TAKEN = define(
    7002, 409, "分组名称已被{holder}使用: {name}", "the group name is already used by a {holder_en}: {name}"
)
POSTFIX_TOO_SHORT = define(
    7003, 400, "后缀位数 {postfix} 不足以表示到 {last}", "{postfix} postfix digits cannot hold the number {last}"
)
BATCH_TOO_LARGE = define(7004, 400, "一次最多操作 {limit} 个用户", "at most {limit} users at a time")
UPLOAD_TOO_LARGE = define(7005, 413, "上传文件过大 (上限 {limit} 字节)", "uploaded file too large (limit {limit} bytes)")
NOT_XLSX = define(7006, 400, "文件不是有效的xlsx表格: {reason}", "the file is not a valid .xlsx workbook: {reason}")
TOO_MANY_ROWS = define(7007, 400, "表格中的用户过多 (上限 {limit} 行)", "too many users in the file (limit {limit} rows)")
BAD_COLUMNS = define(7008, 400, "表格的表头不正确: {reason}", "the header row of the file is wrong: {reason}")
NO_FILE = define(7009, 400, "请求中没有上传文件: {reason}", "no file in the upload: {reason}")
DOWNLOAD_DENIED = define(7010, 403, "下载链接无效或已过期", "the download link is invalid or has expired")
EXPORT_GONE = define(7011, 404, "导出文件已过期或不存在", "the exported file has expired or does not exist")
IMPORT_EMPTY = define(7012, 400, "表格中没有用户数据", "the file holds no users")
DUPLICATE_IN_FILE = define(7013, 400, "用户名在文件中重复 (第 {first} 行已有)", "user name repeated in the file (first on row {first})")
BAD_CELL = define(7014, 400, "{column}: {reason}", "{column}: {reason}")
