"""twistd plugin entries for kvmdesk (no __init__.py in twisted/plugins, by Twisted's rules)."""
from twisted.application.service import ServiceMaker

kvmdesk = ServiceMaker("kvmdesk", "kvmdesk.tap", "kvmdesk VDI controller (REST API on port 50004)", "kvmdesk")
kvmdesk_agent = ServiceMaker(
    "kvmdesk-agent", "kvmdesk.agent.tap", "kvmdesk node agent (signed API on port 50005)", "kvmdesk-agent"
)
