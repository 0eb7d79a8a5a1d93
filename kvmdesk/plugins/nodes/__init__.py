"""Built-in plugin ``nodes``: resource pools (contract #17-#20), and later compute/controller nodes."""
from kvmdesk.plugins.nodes.plugin import *  # noqa: F401,F403  (the hook implementations)
