"""Moved to :mod:`kvmdesk.core.ostypes` (templates need it too); kept for the storage plugin's imports."""
from kvmdesk.core.ostypes import os_type_simple

__all__ = ["os_type_simple"]
