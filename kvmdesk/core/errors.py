"""The error-code catalogue and the exception every handler raises.

Each code is declared once, with its HTTP status and its message in zh-CN (the contract's language,
the default) and English (chosen with ``Accept-Language: en``).  Plugins declare their own codes with
:func:`define` at import time; numbers are unique across the whole process, so a clash is caught the
moment a plugin is imported.

Number ranges: 0 success, 1000-1999 core, 2000-2999 nodes and pools, 3000-3999 network,
4000-4999 storage, 5000-5999 templates, 6000-6999 desktops, 7000-7999 users, 9000+ third-party plugins.
A third-party plugin picks a block of 100 from 9000 up and lists it in ``docs/plugins.md`` (the registry);
two plugins that still clash are both named in one start-up error (:class:`CodeClash`).

Resources are named in both languages (:class:`Resource`): a message that names one (``{resource}``)
says ``节点不存在`` in Chinese and ``node not found`` in English.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Optional

import attrs


@attrs.frozen
class Resource:
    """What a resource is called in each language of the catalogue, e.g. ``Resource("节点", "node")``.

    Pass it as a message parameter (``ApiError(NOT_FOUND, resource=NODE, key=uuid)``); the message
    takes the name of its language.
    """

    zh: str
    en: str

    def named(self, name: Any) -> "Resource":
        """The resource followed by one instance's name (``资源池 lab-1`` / ``resource pool lab-1``)."""
        return Resource(f"{self.zh} {name}", f"{self.en} {name}")

    def text(self, lang: str = "zh") -> str:
        return self.en if lang == "en" else self.zh

    def __str__(self) -> str:
        return self.zh


#: The generic name list endpoints use when a plugin gives none.
RECORD = Resource("记录", "record")


@attrs.frozen
class ErrorCode:
    """One entry of the catalogue.

    :param code: the envelope's ``code``.
    :param status: the HTTP status that goes with it.
    :param zh: message template in zh-CN (``str.format`` placeholders).
    :param en: the same message in English.
    """

    code: int
    status: int
    zh: str
    en: str

    def message(self, lang: str = "zh", params: Mapping[str, Any] | None = None) -> str:
        template = self.en if lang == "en" else self.zh
        values = {k: v.text(lang) if isinstance(v, Resource) else v for k, v in (params or {}).items()}
        try:
            return template.format(**values)
        except (KeyError, IndexError):
            # A missing placeholder must never turn an error answer into a 500.
            return template


CATALOGUE: dict[int, ErrorCode] = {}
#: code -> the module that defined it (to name both sides of a clash).
DEFINED_BY: dict[int, str] = {}


class CodeClash(ValueError):
    """Two modules define the same error code with different messages.

    :ivar code: the number.
    :ivar first: the module that defined it first.
    :ivar second: the module that tried to define it again.
    """

    def __init__(self, code: int, existing: ErrorCode, first: str, second: str):
        self.code, self.existing, self.first, self.second = code, existing, first, second
        super().__init__(f"error code {code} is already defined by {first} as {existing!r}; {second} defines it again")


def define(code: int, status: int, zh: str, en: str, *, module: Optional[str] = None) -> ErrorCode:
    """Declare an error code; refuses a number that is already taken by another message.

    :param module: the defining module (default: the caller's ``__name__``), named in a clash.
    :raises CodeClash: ``code`` is already defined with another message.
    """
    entry = ErrorCode(code, status, zh, en)
    module = module or sys._getframe(1).f_globals.get("__name__", "?")
    existing = CATALOGUE.get(code)
    if existing is not None and existing != entry:
        raise CodeClash(code, existing, DEFINED_BY.get(code, "?"), module)
    CATALOGUE[code] = entry
    DEFINED_BY.setdefault(code, module)
    return entry


class ApiError(Exception):
    """Raised anywhere below a handler; the router turns it into an error envelope.

    :param error: the catalogue entry.
    :param data: optional ``data`` for the envelope (e.g. per-item batch results).
    :param params: values for the message placeholders.
    """

    def __init__(self, error: ErrorCode, data: Any = None, **params: Any):
        super().__init__(error.message("en", params))
        self.error = error
        self.data = data
        self.params = params

    def message(self, lang: str = "zh") -> str:
        return self.error.message(lang, self.params)


SUCCESS = define(0, 200, "成功", "success")

INVALID_JSON = define(1001, 400, "请求体不是有效的JSON: {reason}", "request body is not valid JSON: {reason}")
INVALID_PARAM = define(1002, 400, "参数错误: {field}: {reason}", "invalid parameter {field}: {reason}")
UNKNOWN_FILTER = define(1003, 400, "不支持的查询字段: {field}", "unknown query field: {field}")
SEARCH_NEEDS_FILTER = define(
    1004, 400, "searchtype为{searchtype}时必须提供查询条件", "searchtype {searchtype} needs at least one field filter"
)
BODY_TOO_LARGE = define(1005, 413, "请求体过大 (上限 {limit} 字节)", "request body too large (limit {limit} bytes)")
ROUTE_NOT_FOUND = define(1006, 404, "接口不存在: {path}", "no such endpoint: {path}")
METHOD_NOT_ALLOWED = define(1007, 405, "不支持的请求方法: {method}", "method not allowed: {method}")
UNAUTHENTICATED = define(1008, 401, "未登录或登录已过期", "not logged in or the session has expired")
LOGIN_FAILED = define(1009, 401, "用户名或密码错误", "wrong user name or password")
LOGIN_THROTTLED = define(
    1010, 429, "登录失败次数过多, 请 {seconds} 秒后再试", "too many failed logins, try again in {seconds} seconds"
)
UNKNOWN_ACTION = define(1011, 400, "不支持的操作: {action}", "unknown action: {action}")
NOT_FOUND = define(1012, 404, "{resource}不存在: {key}", "{resource} not found: {key}")
ALREADY_EXISTS = define(1013, 409, "{resource}已存在: {key}", "{resource} already exists: {key}")
STORE_UNAVAILABLE = define(1014, 503, "数据库暂时不可用: {reason}", "the database is unavailable: {reason}")
INTERNAL_ERROR = define(1015, 500, "内部错误, 请求编号 {request_id}", "internal error, request id {request_id}")
UNSUPPORTED_MEDIA = define(1016, 415, "不支持的内容类型: {content_type}", "unsupported content type: {content_type}")
FORBIDDEN = define(1017, 403, "无权执行此操作", "not allowed")
BATCH_EMPTY = define(1018, 400, "未选择任何对象", "no items were given")
IN_USE = define(1019, 409, "{resource}正在使用中, 不能删除: {reason}", "{resource} is in use and cannot be deleted: {reason}")
BAD_HTTP_REQUEST = define(1020, 400, "HTTP 请求格式错误 (请求行, 请求头, 长度或编码)",
                          "malformed HTTP request (request line, headers, length or encoding)")
REQUEST_TIMEOUT = define(1021, 408, "请求超时: {seconds} 秒内未收到完整的请求 ({what})", "request timed out: the {what} did not arrive "
                         "within {seconds} seconds")
OPERATION_INTERRUPTED = define(1022, 500, "操作被中断 (服务停止), 已完成 {done}/{total}",
                               "the operation was interrupted (the service stopped) after {done}/{total}")
