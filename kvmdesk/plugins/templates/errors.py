"""Error codes of the templates plugin (5000-5099; the agent's domain layer has 5100-5199)."""
from __future__ import annotations

from kvmdesk.core.errors import define

UPDATING = define(5001, 409, "模板 {name} 正在更新, 请稍后再试", "template {name} is being updated, try again later")
NO_NODE = define(5002, 409, "参数错误: pool_uuid: 资源池中没有可用的节点 ({reason})",
                 "invalid parameter pool_uuid: no node of the pool can take the template ({reason})")
SUBNET_NOT_IN_NETWORK = define(5003, 400, "参数错误: subnet_uuid: 子网 {subnet} 不属于数据网络 {network}",
                               "invalid parameter subnet_uuid: subnet {subnet} is not in data network {network}")
DISK_SHRINK = define(5004, 400, "参数错误: {field}: 磁盘只能扩容 (当前 {current} GB, 请求 {requested} GB)",
                     "invalid parameter {field}: disks only grow (now {current} GB, asked for {requested} GB)")
NO_SPACE = define(5005, 507, "参数错误: {field}: 节点存储空间不足: {reason}",
                  "invalid parameter {field}: not enough space on the node: {reason}")
MUST_BE_STOPPED = define(5006, 409, "参数错误: {field}: 模板 {name} 运行中, 请先关机",
                         "invalid parameter {field}: template {name} is running, stop it first")
BIND_IP_INVALID = define(5007, 400, "参数错误: bind_ip: {reason}", "invalid parameter bind_ip: {reason}")
BIND_IP_TAKEN = define(5008, 409, "参数错误: bind_ip: {reason}", "invalid parameter bind_ip: {reason}")
TEMPLATE_STATE = define(5009, 409, "模板 {name} 当前状态不允许此操作: {reason}",
                        "not possible in the state of template {name}: {reason}")
NODE_UNAVAILABLE = define(5010, 503, "模板 {name} 所在节点不可用: {reason}",
                          "the node of template {name} is unavailable: {reason}")
SEND_FAILED = define(5012, 502, "模板 {name} 的镜像未能送达节点 {node}: {reason}",
                     "the image of template {name} did not reach node {node}: {reason}")
