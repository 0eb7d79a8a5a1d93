"""kvmdesk: a VDI controller for KVM.

Plugin authors import :data:`hookimpl` from here to mark hook implementations::

    from kvmdesk import hookimpl

    @hookimpl
    def kvmdesk_routes(router):
        ...
"""
import pluggy

__version__ = "0.1.0"

#: Project name used by pluggy; every hook is named ``kvmdesk_*``.
PROJECT_NAME = "kvmdesk"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["__version__", "hookimpl", "hookspec", "PROJECT_NAME"]
