"""``sd35 batch --engine ray``: the rows of a prompts file rendered by ``sd35_core`` in a pool of Ray actors.

Each actor (:class:`~.worker.RowWorker`) loads the models once with ``sd35 generate``'s own loader and renders a
row with ``sd35 generate``'s own per-image code, so a row's image is byte for byte the image ``sd35 generate``
makes with the same options and seed. The rows, their overrides, the output names, the manifest and resume are
those of the ComfyUI engine (:mod:`..rows`, :mod:`..manifest`).

Why tasks over an actor pool and not a Ray Dataset with ``map_batches``: the manifest is the product here.
Every row must end in it exactly once with its own status the moment it finishes, a row whose worker died must
be redone exactly once and then recorded as failed, and a rerun must skip what is done. A Dataset retries
inside its executor (a row that keeps killing workers fails the whole dataset, not the row), shows the driver
only the rows that came through, and needs pandas and pyarrow besides Ray. A pool of actors with one row in
flight each keeps that accounting on the driver in a few lines: in-flight work is bounded by the worker count,
a dead actor is seen as ``RayActorError`` on its row and is replaced, and Ray still does placement (GPUs,
nodes, autoscaling) and transport.

- :mod:`.jobs`: rows as ``sd35 generate`` options, checks, fingerprints;
- :mod:`.worker`: the actor; :mod:`.pool`: the driver loop; :mod:`.session`: starting or joining Ray.
"""

from .session import INSTALL_HINT, connect, import_ray, runtime_env

__all__ = ["INSTALL_HINT", "connect", "import_ray", "runtime_env"]
