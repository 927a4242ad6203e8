"""The pack's HTTP route for the frontend: GET /sd35/defaults serves the Python defaults table."""

import json

from sd35_core.sampling.defaults import DEFAULTS, defaults_json


class RouteTable:
    """Stands in for aiohttp's RouteTableDef: records what the pack registers."""

    def __init__(self):
        self.routes = []

    def get(self, path):
        def register(handler):
            self.routes.append(("GET", path, handler))
            return handler

        return register


def test_defaults_payload_is_the_python_table_as_json(pack):
    from comfyui_sd35.nodes import routes

    payload = json.loads(json.dumps(routes.defaults_payload()))
    assert payload == json.loads(json.dumps(defaults_json()))
    assert set(payload["variants"]) == set(DEFAULTS)
    medium = payload["variants"]["sd3.5_medium"]
    assert medium["slg"]["layers"] == list(DEFAULTS["sd3.5_medium"].slg.layers)
    assert {"euler", "dpmpp_2m"} <= set(payload["samplers"]) and "reference" in payload["schedules"]


def test_register_routes_adds_the_route_once(pack):
    from comfyui_sd35.nodes import routes

    table = RouteTable()
    assert routes.register_routes(table) is True
    assert routes.register_routes(table) is True  # a second import of the pack must not add it twice
    assert [(m, p) for m, p, _ in table.routes] == [("GET", routes.DEFAULTS_ROUTE)]
    assert table.routes[0][2] is routes.get_defaults


def test_register_routes_outside_comfyui_does_nothing(pack):
    from comfyui_sd35.nodes import routes

    assert routes.register_routes() is False
