"""The shipped workflows and the frontend extension in headless Chromium, against a real ComfyUI.

Needs ``COMFYUI_PATH`` (the server comes from the ``server`` fixture of conftest.py: ComfyUI with this pack and tiny
checkpoints), the ``playwright`` Python package and Debian's Chromium at ``/usr/bin/chromium`` (or
``SD35_CHROMIUM``); each missing piece skips the module visibly. Playwright never downloads a browser here.

Screenshots are written to a temporary folder and, when ``SD35_ARTIFACTS`` is set, to that folder too.
"""

import json
import os
import shutil
import urllib.request
import uuid

import pytest

from .comfyui_server import COMFYUI_PATH, PACK_DIR, ROOT, SHARED

WORKFLOWS = os.path.join(ROOT, "workflows")
CHROMIUM = os.environ.get("SD35_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EXTENSION_MARKERS = ("comfyui_sd35", "comfyui-sd35", "sd35.js", "/sd35/")
TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the browser test needs a ComfyUI checkout"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
# The `server` fixture (conftest.py) follows ComfyUI's progress over its websocket.
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")

WORKFLOW_NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
TINY_CHECKPOINTS = {"sd3.5_medium": "tiny-sd3.5_medium.safetensors", "sd3.5_large": "tiny-sd3.5_large.safetensors",
                    "sd3_medium": "tiny-sd3_medium.safetensors"}


# ------------------------------------------------------------------------------------------------- fixtures

class Browser:
    """One Chromium page on the ComfyUI frontend, with what its console said."""

    def __init__(self, page, artifacts: list[str]):
        self.page = page
        self.artifacts = artifacts
        self.console: list[tuple[str, str, str]] = []  # (type, text, location url)
        self.page_errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.page_errors.append(f"{e}\n{e.stack or ''}"))
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: self.failed.append(f"failed {r.url}"))

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def screenshot(self, name: str) -> list[str]:
        paths = [os.path.join(d, f"{name}.png") for d in self.artifacts]
        self.page.screenshot(path=paths[0])
        for path in paths[1:]:
            shutil.copy(paths[0], path)
        return paths

    def mark(self) -> tuple[int, int, int]:
        """Where the logs stand now, so a test checks only what happened during it."""
        return len(self.console), len(self.page_errors), len(self.failed)

    def extension_errors(self, since: tuple[int, int, int] = (0, 0, 0)) -> list[str]:
        """Errors and warnings the page reported that involve this pack's extension, route or files."""
        found = [f"{kind}: {text} ({url})" for kind, text, url in self.console[since[0]:]
                 if kind in ("error", "warning") and any(m in text + url for m in EXTENSION_MARKERS)]
        found += [e for e in self.page_errors[since[1]:] if any(m in e for m in EXTENSION_MARKERS)]
        found += [f for f in self.failed[since[2]:] if any(m in f for m in EXTENSION_MARKERS)]
        return found

    def load_workflow(self, name: str) -> dict:
        """Load a shipped workflow through the template route and app.loadGraphData; report what it found."""
        return self.js("""async (name) => {
            const response = await fetch(`/api/workflow_templates/comfyui_sd35/${name}.json`);
            const workflow = await response.json();
            window.__sd35Missing = [];
            await app.loadGraphData(workflow, true, true, name, {showMissingModelsDialog: false});
            await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 200)));
            return {
                missing: window.__sd35Missing.map((m) => (typeof m === "string" ? m : m.type)),
                unregistered: app.graph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type])
                    .map((n) => n.type),
                errors: app.graph.nodes.filter((n) => n.has_errors).map((n) => n.type),
                serialized: app.graph.serialize(),
                prompt: (await app.graphToPrompt()).output,
            };
        }""", name)

    def node_id(self, node_type: str) -> int:
        ids = self.js("(t) => app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)
        assert len(ids) == 1, (node_type, ids)
        return ids[0]

    def widgets(self, node_id: int) -> dict:
        return self.js("""(id) => Object.fromEntries(app.graph.getNodeById(id).widgets
            .filter((w) => w.serialize !== false).map((w) => [w.name, w.value]))""", node_id)

    def set_widgets(self, node_id: int, values: dict) -> None:
        self.js("""([id, values]) => {
            const node = app.graph.getNodeById(id);
            for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
        }""", [node_id, values])

    def status(self, node_id: int) -> str:
        return self.js("""(id) => {
            const w = app.graph.getNodeById(id).widgets?.find((w) => w.name === "sd35_status");
            return w ? w.element.innerText : "";
        }""", node_id)

    def queue_and_wait_for_image(self, save_id: int) -> list[int]:
        """Queue the graph with the Run button, wait until the save node shows its image; its [width, height]."""
        self.page.locator('[data-testid="queue-button"]').click()
        self.page.wait_for_function("""(id) => {
            const images = app.nodeOutputs?.[String(id)]?.images;
            const node = app.graph.getNodeById(id);
            return images?.length && node.imgs?.length && node.imgs[0].complete && node.imgs[0].naturalWidth > 0;
        }""", arg=save_id, timeout=TIMEOUT_MS)
        return self.js("(id) => [app.graph.getNodeById(id).imgs[0].naturalWidth, "
                       "app.graph.getNodeById(id).imgs[0].naturalHeight]", save_id)

    def click_widget(self, node_id: int, widget_name: str) -> None:
        """A real mouse click on a canvas widget (the node is centred in view first)."""
        x, y = self.js("""async ([id, name]) => {
            const node = app.graph.getNodeById(id);
            app.canvas.ds.scale = 1;
            app.canvas.centerOnNode(node);
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 100)));
            const w = node.widgets.find((w) => w.name === name);
            const height = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
            const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                                                  node.pos[1] + w.y + height / 2]);
            const rect = app.canvas.canvas.getBoundingClientRect();
            return [rect.left + cx / window.devicePixelRatio, rect.top + cy / window.devicePixelRatio];
        }""", [node_id, widget_name])
        self.page.mouse.click(x, y)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[str]:
    folders = [str(tmp_path_factory.mktemp("browser_screenshots"))]
    if os.environ.get("SD35_ARTIFACTS"):
        os.makedirs(os.environ["SD35_ARTIFACTS"], exist_ok=True)
        folders.append(os.environ["SD35_ARTIFACTS"])
    return folders


@pytest.fixture(scope="module")
def browser(server, artifacts):
    upload_image(server.url, os.path.join(SHARED, "images", "canny.png"), "example.png")
    # A fresh ComfyUI user opens on the template dialog and then loads a starter graph of its own;
    # marking the tutorial as seen keeps that from racing with the workflows the tests load.
    server.post("/settings/Comfy.TutorialCompleted", True)
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = chromium.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            b = Browser(page, artifacts)
            page.goto(server.url)
            page.wait_for_function("() => window.app?.graph?.nodes?.length && window.app.extensions?.length",
                                   timeout=TIMEOUT_MS)  # the default graph is on the canvas: start-up is over
            page.wait_for_timeout(500)
            # Capture missing node types the way the frontend reports them to extensions.
            b.js("""() => app.registerExtension({name: "sd35.test.capture", afterConfigureGraph(missing) {
                window.__sd35Missing = [...(window.__sd35Missing ?? []), ...missing]; }})""")
            yield b
        finally:
            chromium.close()


def upload_image(url: str, path: str, name: str) -> None:
    """POST an image to ComfyUI's input folder under ``name`` (what a person does with Load Image's upload)."""
    boundary = uuid.uuid4().hex
    with open(path, "rb") as f:
        data = f.read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(f"{url}/upload/image", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["name"] == name


def load_json(*parts):
    with open(os.path.join(WORKFLOWS, *parts), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------- tests

def test_extension_is_loaded_and_the_template_browser_lists_the_workflows(browser, server):
    assert "comfyui-sd35" in browser.js("() => app.extensions.map((e) => e.name)")
    try:
        server.get("/sd35/defaults")
    except OSError as e:
        raise AssertionError(f"GET /sd35/defaults failed ({e}): the pack must call nodes.routes.register_routes() "
                             "when ComfyUI imports it") from None
    templates = server.get_json("/api/workflow_templates")
    assert sorted(templates[PACK_DIR]) == WORKFLOW_NAMES
    page = browser.page
    browser.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(".p-dialog")
    try:
        page.get_by_text(PACK_DIR, exact=True).first.click()
        browser.screenshot("template_browser")
        # The dialog shows a page of twelve and loads more on scroll; its search box finds each one.
        search = dialog.get_by_placeholder("Search templates...")
        for name in WORKFLOW_NAMES:
            search.fill(name)
            sync_api.expect(dialog.get_by_text(name, exact=True).first).to_be_visible()
        search.fill("sd3.5_medium_txt2img_slg")
        dialog.get_by_text("sd3.5_medium_txt2img_slg", exact=True).first.click()  # a person's way in
        page.wait_for_function("() => app.graph.nodes.some((n) => n.type === 'SD35Sampler')")
    finally:
        if dialog.count() and dialog.first.is_visible():  # never leave its mask over the canvas for later tests
            page.keyboard.press("Escape")
            sync_api.expect(page.locator(".p-dialog-mask")).to_have_count(0)
    # The workflows ship without thumbnails; the browser's 404 for each preview image is expected.
    browser.failed[:] = [f for f in browser.failed if not f.endswith(".jpg")]
    browser.console[:] = [c for c in browser.console if "Failed to cache media" not in c[1] and
                          not c[2].endswith(".jpg")]
    assert browser.extension_errors() == []


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_loads_in_the_frontend(browser, name):
    start = browser.mark()
    result = browser.load_workflow(name)
    assert result["missing"] == [] and result["unregistered"] == [], result["missing"] + result["unregistered"]
    assert result["errors"] == []
    ui = load_json(f"{name}.json")
    # The frontend keeps every widget value, and what it would queue is exactly the API twin.
    saved = {n["id"]: n.get("widgets_values", []) for n in result["serialized"]["nodes"]}
    assert saved == {n["id"]: n["widgets_values"] for n in ui["nodes"]}
    assert result["prompt"] == load_json("api", f"{name}.json")
    # Nothing is cut off: every node is at least as large as the frontend needs to draw it.
    too_small = browser.js("""() => app.graph.nodes.map((n) => [n.type, n.size, n.computeSize()])
        .filter(([, size, needed]) => needed[1] > size[1] + 0.5)""")
    assert too_small == []
    browser.screenshot(f"workflow_{name}")
    assert browser.extension_errors(start) == []


def test_the_tiny_shapes_workflow_runs_as_shipped_and_shows_its_image(browser):
    start = browser.mark()
    browser.load_workflow("tiny_shapes_txt2img")
    loader, save = browser.node_id("SD35CheckpointLoader"), browser.node_id("SaveImage")
    assert browser.widgets(loader)["ckpt_name"] == "tiny_shapes_sd35.safetensors"  # listed by the loader as is
    assert browser.queue_and_wait_for_image(save) == [64, 64]
    status = browser.status(loader)
    assert "text encoders: clip_l, clip_g, t5xxl" in status and "VAE: bundled" in status, status
    browser.js("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    browser.page.wait_for_timeout(300)
    browser.screenshot("tiny_shapes_txt2img_done")  # the README's picture of a workflow
    assert browser.extension_errors(start) == []


def test_preset_control_fills_the_recommended_settings(browser, server):
    start = browser.mark()
    from sd35_core.sampling.defaults import defaults_json

    table = server.get_json("/sd35/defaults")
    assert table == json.loads(json.dumps(defaults_json()))  # the route serves the Python table itself
    browser.load_workflow("sd3.5_medium_txt2img_slg")
    sampler = browser.node_id("SD35Sampler")
    before = browser.widgets(sampler)
    turbo = table["variants"]["sd3.5_large_turbo"]

    browser.click_widget(sampler, "preset")  # opens the combo's menu
    browser.page.locator(".litecontextmenu .litemenu-entry", has_text=turbo["label"]).first.click()
    assert browser.js("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'preset').value",
                      sampler) == turbo["label"]
    browser.click_widget(sampler, "apply preset")
    browser.page.wait_for_function("""([id, steps]) =>
        app.graph.getNodeById(id).widgets.find((w) => w.name === 'steps').value === steps""",
                                   arg=[sampler, turbo["steps"]])
    after = browser.widgets(sampler)
    assert {k: after[k] for k in ("steps", "cfg", "sampler", "schedule", "shift", "slg_scale")} == {
        "steps": turbo["steps"], "cfg": turbo["cfg"], "sampler": turbo["sampler"], "schedule": turbo["schedule"],
        "shift": turbo["shift"], "slg_scale": 0.0}
    untouched = ("seed", "control_after_generate", "denoise", "seed_mode")
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    assert f"preset: {turbo['label']} applied" in browser.status(sampler)
    # The preset widgets are controls, not inputs: they are neither saved nor sent with the prompt.
    prompt = browser.js("async () => (await app.graphToPrompt()).output")
    assert set(prompt[str(sampler)]["inputs"]) == set(load_json("api", "sd3.5_medium_txt2img_slg.json")[
        str(sampler)]["inputs"])
    browser.screenshot("preset_turbo")
    assert browser.extension_errors(start) == []


def test_tiny_txt2img_runs_and_the_extension_reports_the_model(browser, server):
    start = browser.mark()
    browser.load_workflow("sd3.5_medium_txt2img_slg")
    loader, sampler = browser.node_id("SD35CheckpointLoader"), browser.node_id("SD35Sampler")
    save = browser.node_id("SaveImage")
    browser.set_widgets(loader, {"ckpt_name": TINY_CHECKPOINTS["sd3.5_medium"]})
    browser.set_widgets(browser.node_id("SD35EmptyLatent"), {"width": 64, "height": 48})
    browser.set_widgets(sampler, {"steps": 4, "slg_end": 0.6})  # the SLG window must cover a step of four
    assert "detected model" == browser.widgets(sampler).get("preset", "detected model")

    size = browser.queue_and_wait_for_image(save)
    image = browser.js("(id) => app.nodeOutputs[String(id)].images[0]", save)
    assert image["filename"].startswith("sd3.5_medium_txt2img_slg") and image["type"] == "output"
    assert size == [64, 48]

    # (2) The loader shows what it detected; the sampler knows the depth of the model that feeds it.
    info = browser.js("(id) => app.graph.getNodeById(id).sd35Info ?? null", loader)
    assert info is not None, "SD35CheckpointLoader sent no {'ui': {'sd35_info': [...]}} with its result"
    assert info["variant"] == "sd3.5_medium" and info["depth"] == 10, info
    loader_status = browser.status(loader)
    assert "SD3.5 Medium" in loader_status and "depth 10" in loader_status and info["dtype"] in loader_status
    assert "text encoders: none bundled" in loader_status and "VAE: bundled" in loader_status
    encoders_status = browser.status(browser.node_id("SD35TextEncoderLoader"))
    assert "clip_l, clip_g, t5xxl" in encoders_status
    assert "model: SD3.5 Medium · depth 10" in browser.status(sampler)
    browser.screenshot("txt2img_done")

    # (1) "detected model" applies that model's recommended settings, with its skip-layer guidance.
    table = server.get_json("/sd35/defaults")["variants"]["sd3.5_medium"]
    browser.click_widget(sampler, "apply preset")
    browser.page.wait_for_function("""([id, steps]) =>
        app.graph.getNodeById(id).widgets.find((w) => w.name === 'steps').value === steps""",
                                   arg=[sampler, table["steps"]])
    after = browser.widgets(sampler)
    assert (after["cfg"], after["sampler"], after["shift"]) == (table["slg"]["cfg"], table["sampler"], table["shift"])
    assert (after["slg_layers"], after["slg_scale"], after["slg_start"], after["slg_end"]) == (
        ",".join(map(str, table["slg"]["layers"])), table["slg"]["scale"], table["slg"]["start"], table["slg"]["end"])

    # (3) The SLG layer field is checked while typing, against depth 10; a warning, never a block.
    browser.click_widget(sampler, "slg_layers")
    field = browser.page.locator(".graphdialog input.value")
    field.wait_for()
    field.fill("")
    browser.page.keyboard.type("7,8,12")
    hint = browser.page.locator(".graphdialog .sd35-warning")
    sync_api.expect(hint).to_contain_text("12 not in this model: it has 10 blocks (0-9)")
    assert "12 not in this model" in browser.status(sampler)  # shown on the node before the value is committed
    browser.screenshot("slg_warning_typing")
    browser.page.keyboard.press("Enter")
    browser.page.wait_for_function("""(id) =>
        app.graph.getNodeById(id).widgets.find((w) => w.name === 'slg_layers').value === '7,8,12'""", arg=sampler)
    assert "12 not in this model" in browser.status(sampler)
    prompt = browser.js("async () => (await app.graphToPrompt()).output")
    assert prompt[str(sampler)]["inputs"]["slg_layers"] == "7,8,12"  # queueing is still possible
    # Typing a bad value and pressing Escape keeps the old value, and the node shows its (valid) state again.
    browser.set_widgets(sampler, {"slg_layers": "7,8,9"})
    browser.click_widget(sampler, "slg_layers")
    field.wait_for()
    field.fill("")
    browser.page.keyboard.type("7,8,99")
    sync_api.expect(hint).to_contain_text("99 not in this model")
    browser.page.keyboard.press("Escape")
    browser.page.wait_for_function("(id) => !app.graph.getNodeById(id).widgets.find((w) => w.name === "
                                   "'sd35_status').element.querySelector('.sd35-warning')", arg=sampler)
    assert browser.widgets(sampler)["slg_layers"] == "7,8,9"
    browser.screenshot("slg_fixed")
    assert browser.extension_errors(start) == []


def test_controlnet_workflow_runs_and_detected_preset_uses_the_controlnet_settings(browser, server):
    start = browser.mark()
    browser.load_workflow("sd3.5_large_controlnet_canny")
    loader, sampler = browser.node_id("SD35CheckpointLoader"), browser.node_id("SD35Sampler")
    cn_loader, save = browser.node_id("SD35ControlNetLoader"), browser.node_id("SaveImage")
    browser.set_widgets(loader, {"ckpt_name": TINY_CHECKPOINTS["sd3.5_large"]})
    browser.set_widgets(cn_loader, {"control_net_name": "tiny-sd3.5_large_controlnet_canny.safetensors"})
    browser.set_widgets(browser.node_id("SD35EmptyLatent"), {"width": 64, "height": 64})
    browser.set_widgets(sampler, {"steps": 2})
    browser.queue_and_wait_for_image(save)

    info = browser.js("(id) => app.graph.getNodeById(id).sd35Info ?? null", cn_loader)
    assert info is not None, "SD35ControlNetLoader sent no {'ui': {'sd35_info': [...]}} with its result"
    assert info["control_type"] == "canny" and "canny ControlNet" in browser.status(cn_loader)
    assert "SD3.5 Large" in browser.status(loader)

    expected = server.get_json("/sd35/defaults")["variants"]["sd3.5_large_controlnet_canny"]
    browser.click_widget(sampler, "apply preset")  # preset is "detected model": Large with a canny ControlNet
    browser.page.wait_for_function("""([id, steps]) =>
        app.graph.getNodeById(id).widgets.find((w) => w.name === 'steps').value === steps""",
                                   arg=[sampler, expected["steps"]])
    after = browser.widgets(sampler)
    assert (after["cfg"], after["sampler"], after["shift"], after["slg_scale"]) == (
        expected["cfg"], expected["sampler"], expected["shift"], 0.0)
    assert f"preset: {expected['label']} applied" in browser.status(sampler)
    # Skip-layer guidance is off (scale 0), so layers beyond this tiny model's 4 blocks are no concern.
    assert "not in this model" not in browser.status(sampler)
    browser.screenshot("controlnet_done")
    assert browser.extension_errors(start) == []
