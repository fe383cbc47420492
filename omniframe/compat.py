"""The old name of :mod:`omniframe.chain` (the chain check), kept for code that imports it."""

from omniframe.chain import IncompatibleStages, check_chain

__all__ = ["IncompatibleStages", "check_chain"]
