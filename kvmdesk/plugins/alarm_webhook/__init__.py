"""Built-in example plugin ``alarm_webhook``: posts every alarm opening and closing to a webhook.

Set ``[alarm_webhook] url`` (empty: the plugin does nothing).  Each ``kvmdesk_alarm`` becomes one
``POST`` of ``{"event": "opened"|"closed", "alarm": {...the alarm record...}}`` as JSON, with the
optional ``[alarm_webhook] token`` as a bearer token; a failed delivery is logged, not retried.
It is also the shape of any notification plugin: implement ``kvmdesk_alarm`` and send.
"""
from kvmdesk.plugins.alarm_webhook.plugin import *  # noqa: F401,F403  (the hook implementations)
