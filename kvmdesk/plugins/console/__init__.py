"""Built-in plugin ``console``: the websocket console relay, the console page and console tokens for
administrators (issue 18)."""
from kvmdesk.plugins.console.plugin import *  # noqa: F401,F403  (the hook implementations)
