"""HTTP routes the pack adds to ComfyUI's server, for the frontend extension (``js/sd35.js``).

``GET /sd35/defaults`` (ComfyUI also serves it as ``/api/sd35/defaults``) returns the recommended settings
table, :func:`sd35_core.sampling.defaults.defaults_json`, so the browser never keeps a copy of its own.

The server's route table comes from :func:`host.server_routes` (``host.py`` is the only door to ComfyUI);
outside ComfyUI there is none and :func:`register_routes` does nothing.
"""

from __future__ import annotations

import logging

from ..sd35_core.sampling.defaults import defaults_json
from . import host

log = logging.getLogger(__name__)

DEFAULTS_ROUTE = "/sd35/defaults"

_registered: set[int] = set()  # ids of route tables already given our routes (an import may run twice)


def defaults_payload() -> dict:
    """The body of ``GET /sd35/defaults``: the defaults table as plain JSON data."""
    return defaults_json()


async def get_defaults(request):
    """aiohttp handler for ``GET /sd35/defaults``."""
    from aiohttp import web  # ComfyUI's server library; only needed once a request arrives

    return web.json_response(defaults_payload())


def register_routes(routes=None) -> bool:
    """Add the pack's routes to ``routes`` (an aiohttp ``RouteTableDef``), by default ComfyUI's own table.

    Returns ``True`` when the routes are (or already were) registered, ``False`` outside a running ComfyUI.
    ComfyUI imports custom nodes before it builds its web app, so routes added at import time are served,
    under both ``/sd35/...`` and ``/api/sd35/...``.
    """
    if routes is None:
        server_routes = getattr(host, "server_routes", None)
        routes = server_routes() if server_routes is not None else None
    if routes is None:
        return False
    if id(routes) not in _registered:
        routes.get(DEFAULTS_ROUTE)(get_defaults)
        _registered.add(id(routes))
        log.debug("sd35: registered %s", DEFAULTS_ROUTE)
    return True
