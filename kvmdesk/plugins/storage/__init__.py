"""Built-in plugin ``storage``: base images (contract #21-#26), template disk images on nodes (#34-#35)
and the ISO library (#59-#63), with streamed uploads and verified, resumable transfers to every node."""
from kvmdesk.plugins.storage.plugin import *  # noqa: F401,F403  (the hook implementations)
