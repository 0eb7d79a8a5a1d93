"""Image files on a node: base images and template disk images received from the controller.

:mod:`.protocol` is the transfer protocol (shared with the controller's storage plugin), :mod:`.store`
the files on disk, :mod:`.routes` the endpoints the agent's application mounts.
"""
