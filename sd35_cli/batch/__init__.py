"""``sd35 batch``: render a prompts file through ComfyUI servers, or on Ray, and bring every image home.

Two engines behind the same rows, output names, manifest and resume. ``--engine comfyui`` (the default)
queues a workflow on ComfyUI servers over their HTTP API, with the standard library only;
``websocket-client`` (the ``batch`` extra) adds live per-step progress, and without it the client polls
``/history``. ``--engine ray`` (the ``ray`` extra) runs ``sd35_core`` itself in a pool of Ray actors, with
``sd35 generate``'s model options (:mod:`.ray_engine`). The modules: :mod:`.rows` (prompts files),
:mod:`.workflow` (loading, API/UI formats), :mod:`.object_info` (the server's node descriptions),
:mod:`.validation` (checks before queueing), :mod:`.targets` (where columns go, per-row patching),
:mod:`.client` (one server's HTTP API and websocket), :mod:`.scheduler` (which server next), :mod:`.manifest`
(the resumable JSONL record), :mod:`.runner` (the ComfyUI run), :mod:`.cli` (options).

As an ``sd35`` subcommand this package provides ``HELP``, ``DESCRIPTION``, ``add_arguments`` and ``run``.
"""

from .cli import DESCRIPTION, HELP, add_arguments, main, run

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "main", "run"]
