"""``sd35 batch``: queue a prompts file through one or more ComfyUI servers and bring every image home.

Standard library only; ``websocket-client`` (the ``batch`` extra) adds live per-step progress, and without it
the client polls ``/history``. The modules: :mod:`.rows` (prompts files), :mod:`.workflow` (API/UI formats,
checks, patching), :mod:`.client` (one server's HTTP API and websocket), :mod:`.scheduler` (which server
next), :mod:`.manifest` (the resumable JSONL record), :mod:`.runner` (the run), :mod:`.cli` (options).

As an ``sd35`` subcommand this package provides ``HELP``, ``DESCRIPTION``, ``add_arguments`` and ``run``.
"""

from .cli import DESCRIPTION, HELP, add_arguments, main, run

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "main", "run"]
