"""Error codes of the monitoring plugin (8000-8099), with their HTTP status and zh-CN/en messages."""
from __future__ import annotations

from kvmdesk.core.errors import define

NODE_UNKNOWN = define(8000, 404, "节点不存在: {field}={uuid}", "no such node: {field}={uuid}")
OUT_OF_RANGE = define(8001, 400, "参数超出范围: {field}: {reason}", "parameter out of range: {field}: {reason}")
PERIOD_TOO_LONG = define(8002, 400, "统计周期过长: {field}: 只保留最近 {seconds} 秒的原始数据",
                         "period too long: {field}: raw samples are kept for the last {seconds} seconds only")
STEP_MISMATCH = define(8003, 400, "参数不匹配: {field}: {reason}", "parameters do not fit together: {field}: {reason}")
RULE_UNKNOWN = define(8004, 404, "告警规则不存在: {uuid}", "no such alarm rule: {uuid}")
