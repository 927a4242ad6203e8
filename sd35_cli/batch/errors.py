"""Exceptions of the batch client. Every one of them is reported as one line, without a traceback."""

from __future__ import annotations


class BatchError(Exception):
    """Something the user can fix (a file, an option, a server address); the message says what and where."""


class PromptsFileError(BatchError, ValueError):
    """The prompts file cannot be read as asked (bad JSON line, missing header, a value of the wrong type)."""


class WorkflowError(BatchError, ValueError):
    """The workflow cannot be used: unreadable, unknown node types, a column with nowhere to go."""


class ServerUnreachable(BatchError):
    """A ComfyUI server did not answer (refused, reset, timed out)."""


class ServerError(BatchError):
    """A ComfyUI server answered with something other than what its API promises."""


class PromptRejected(BatchError):
    """``/prompt`` refused one prompt (HTTP 400): the node errors are in ``node_errors``."""

    def __init__(self, message: str, node_errors: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}
