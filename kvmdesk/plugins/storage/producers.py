"""Moved to :mod:`kvmdesk.core.producers` (node agents send files with it too); this name is the same module."""
import sys

from kvmdesk.core import producers as _moved

sys.modules[__name__] = _moved
