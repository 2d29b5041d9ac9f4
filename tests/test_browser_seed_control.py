"""A seed that cannot change the result must not invalidate ComfyUI's cache.

In ComfyUI's real frontend (the pinned 1.32.9, headless Chromium, tests/test_browser_ui.py's harness) against
the session server: the pack's web extension (web/seed_control.js) starts the seed control of Tiled Upscale
and the Chain-of-Zoom nodes at "fixed" (SDX4 Upscale keeps the frontend's "randomize"); a GAN upscale queued
twice from the UI is then served from the cache the second time, where the frontend's randomize reruns it; a
saved workflow keeps the control value saved with it.
"""
from __future__ import annotations

import json
import os

import pytest

from comfy_browser import ComfyBrowser, chromium_available  # noqa: E402 - conftest puts scripts/ on sys.path
from test_comfyui_integration import BUNDLED

pytestmark = pytest.mark.browser
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO, "example_workflows", "Tiled Upscale 2x, any scale.json")

_JS_CONTROLS_OF_NEW_NODES = """(types) => Object.fromEntries(types.map((type) => {
  const node = LiteGraph.createNode(type);
  const seed = node.widgets.find((w) => w.name === 'seed');
  return [type, (seed.linkedWidgets || []).map((w) => w.value)];
}))"""

_JS_BUILD_GAN_UPSCALE = """([image, model]) => {
  app.graph.clear();
  const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  const load = add('LoadImage', 20, 20), loader = add('DreamForgeLoadUpscaler', 20, 420);
  const tiled = add('DreamForgeTiledUpscale', 420, 20), preview = add('PreviewImage', 900, 20);
  set(load, 'image', image); set(loader, 'model_name', model); set(tiled, 'scale', 2.0);
  load.connect(0, tiled, tiled.findInputSlot('image'));
  loader.connect(0, tiled, tiled.findInputSlot('upscaler'));
  tiled.connect(0, preview, 0);
  app.graph.setDirtyCanvas(true, true);
  return tiled.id;
}"""

_JS_SEED_AND_CONTROL = """(id) => { const seed = app.graph.getNodeById(id).widgets.find((w) => w.name === 'seed');
  return [seed.value, seed.linkedWidgets[0].value]; }"""


@pytest.fixture(scope="module")
def ui(comfy):
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc}): pip install -r requirements-dev.txt")
    if not chromium_available():
        if os.environ.get("CI"):
            pytest.fail("browser test cannot run in CI: Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed: bash scripts/setup_browser.sh")
    with ComfyBrowser() as browser:
        page = browser.open(comfy.url)
        yield page
        assert not [line for line in browser.console if "seed_control" in line and "error" in line.lower()]


def _queue_twice(ui, tiled_id: int) -> tuple[list, list]:
    """Queue from the UI twice; (nodes cached, seed + control) per run."""
    cached, seeds = [], []
    for _ in range(2):
        seeds.append(ui.page.evaluate(_JS_SEED_AND_CONTROL, tiled_id))
        prompt_id = ui.queue_from_ui()
        events = ui.wait_for_prompt(prompt_id, timeout=180)
        cached.append([str(n) for e in events if e["type"] == "execution_cached" for n in e["detail"]["nodes"]])
    return cached, seeds


def test_new_nodes_whose_seed_a_gan_ignores_start_fixed(ui):
    ui.new_blank_workflow()
    controls = ui.page.evaluate(_JS_CONTROLS_OF_NEW_NODES, [
        "DreamForgeTiledUpscale", "DreamForgeCoZStep", "DreamForgeCoZLoop", "DreamForgeCoZUpscale",
        "DreamForgeSDX4Upscale"])
    assert controls == {"DreamForgeTiledUpscale": ["fixed"], "DreamForgeCoZStep": ["fixed"],
                        "DreamForgeCoZLoop": ["fixed"], "DreamForgeCoZUpscale": ["fixed"],
                        "DreamForgeSDX4Upscale": ["randomize"]}  # SD x4's seed always changes its result


def test_a_gan_upscale_queued_twice_is_served_from_the_cache(ui):
    ui.new_blank_workflow()
    tiled = ui.page.evaluate(_JS_BUILD_GAN_UPSCALE, ["coffee_64.png", BUNDLED])
    cached, seeds = _queue_twice(ui, tiled)
    assert seeds[0] == seeds[1] and seeds[0][1] == "fixed"
    assert str(tiled) in cached[1]
    # what the frontend's own default did: randomize changes the seed after each queue, and the upscale reruns
    ui.set_widget(tiled, "control_after_generate", "randomize")
    cached, seeds = _queue_twice(ui, tiled)
    assert seeds[0][0] != seeds[1][0] and str(tiled) not in cached[1]


def test_a_saved_workflow_keeps_its_saved_control(ui, tmp_path):
    workflow = json.loads(open(TEMPLATE, encoding="utf-8").read())
    node = next(n for n in workflow["nodes"] if n["type"] == "DreamForgeTiledUpscale")
    index = node["widgets_values"].index("fixed")  # the seed's control, right after the seed
    node["widgets_values"][index] = "randomize"
    path = tmp_path / "saved_with_randomize.json"
    path.write_text(json.dumps(workflow))
    ui.new_blank_workflow()
    ui.open_workflow_file(path)
    ui.close_dialogs()
    assert ui.page.evaluate(_JS_SEED_AND_CONTROL, node["id"])[1] == "randomize"
    live = next(n for n in ui.live_nodes() if n["id"] == node["id"])
    assert [w["value"] for w in live["widgets"]] == node["widgets_values"]  # every value in its place
