"""The pack's exceptions, in one small module every layer may import.

Each message names the file, field or setting at fault and what was expected.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file is not the checkpoint that was expected; the message names the file and what was expected."""


class NonFiniteError(ArithmeticError):
    """A tensor that should hold finite numbers holds NaN or infinity; the message says where and what to try."""


class Interrupted(Exception):
    """Raised when the run's ``should_cancel`` hook returns true during sampling."""
