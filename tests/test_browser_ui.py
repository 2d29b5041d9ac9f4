"""The pack in ComfyUI's real web UI: Debian's Chromium, headless, driven by Playwright for Python,
against the session's real ComfyUI 0.3.75 server (the `comfy` fixture) with its real frontend package.

For every UI workflow in example_workflows/ a user's path is followed: open the file (Ctrl+O and the
file chooser), check ComfyUI raised no "missing nodes" dialog and no load warning, check every node's
widget values in the page equal the file's (a known failure mode of other packs) and that the prompt
the frontend builds equals the API twin, click Run, wait for the frontend to hear the run succeed and
for the output image to be shown (decoded in the output node on the canvas and as an <img> in the
page), then save a screenshot to out/browser/NAME.png. The workflows are also opened from the
templates dialog, and a node is added from the node search box by typing its display name.

The input is scikit-image's astronaut (the face, 128 px) saved as astronaut.png in the server's input
folder. The prompt-model workflow names Qwen2.5-VL-3B-Instruct, which cannot be had offline: after the
load checks, its Load Prompt Model is switched in the page to a tiny random Qwen2-VL (tests/tiny_vlm.py),
the only change made before running (example_workflows.run_variant). The SD x4 workflow names
models/diffusers/stable-diffusion-x4-upscaler, where the set-up puts a tiny random SD x4 upscaler
(tests/tiny_sdx4.py): it runs unchanged and its output is noise of the right size. Likewise the
Chain-of-Zoom-with-its-own-model workflow runs unchanged on a tiny random SD3 and LoRA files
(tests/tiny_sd3.py) under SD3 medium's folder name and models/loras/chain-of-zoom.

Chromium comes from scripts/setup_browser.sh (called by scripts/setup_env.sh); without it the tests skip,
except under CI, where they fail.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from PIL import Image

from comfy_browser import ComfyBrowser, chromium_available  # noqa: E402 - conftest puts scripts/ on sys.path
from example_workflows import (  # noqa: E402
    BY_NAME, INPUT_IMAGE, PROMPT_MODEL_LOADER, REPO_ROOT, TINY_VLM, api_differences, install_inputs, run_variant,
    ui_workflow_files,
)
from workflow_expectations import EXPECTED_OUTPUTS, INPUT_SIDE  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = REPO_ROOT / "out" / "browser"
PACK_FOLDER = "dreamforge-upscale-test"  # the pack's folder name under custom_nodes (tests/conftest.py)
IMAGE_NODES = ("SaveImage", "PreviewImage")
LOADER_FILES = {"DreamForgeLoadUpscaler": ("model_name",),  # loader -> its widgets that name model files
                "DreamForgeLoadCoZModel": ("base_model", "transformer_lora", "vae_lora")}
WORKFLOWS = ui_workflow_files()


def _need_browser():
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        why = f"playwright is not installed ({exc}): pip install -r requirements-dev.txt"
    if why is None and not chromium_available():
        why = "Debian's chromium is not installed: bash scripts/setup_browser.sh"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(comfy):
    install_inputs(comfy, image_size=INPUT_SIDE)  # astronaut.png, the tiny VLM, tiny SD x4 and SD3 models
    return comfy


@pytest.fixture(scope="module")
def browser(server):
    _need_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ComfyBrowser(viewport=(1600, 1000)) as b:
        yield b
        (ARTIFACTS / "console.log").write_text("\n".join(b.console) + "\n")


@pytest.fixture(scope="module")
def ui(browser, server):
    return browser.open(server.url)


@pytest.fixture
def fresh(ui):
    """Each test starts from an empty workflow tab with no dialog open."""
    ui.close_dialogs()
    ui.new_blank_workflow()
    ui.clear_toasts()
    yield ui
    ui.close_dialogs()


def _object_info(server) -> dict:
    if not hasattr(server, "_df_object_info"):
        server._df_object_info = server.object_info()
    return server._df_object_info


def _check_loaded_as_in_file(ui, workflow: dict) -> None:
    """No missing-nodes dialog or load warning; every node and widget value as in the file."""
    assert ui.loaded_differences(workflow) == []


# ------------------------------------------------------------------------------------- tests
def test_every_example_has_a_thumbnail_and_an_api_twin():
    assert WORKFLOWS, "no UI workflows in example_workflows/"
    assert sorted(p.stem for p in WORKFLOWS) == sorted(BY_NAME), "example_workflows/ and EXAMPLES disagree"
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no thumbnail"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and 256 <= im.width <= 512, (thumb.name, im.format, im.size)
        assert thumb.stat().st_size < 60_000, thumb.name
        assert (path.parent / "api" / path.name).is_file(), f"{path.name} has no API twin in example_workflows/api/"
        workflow = json.loads(path.read_text())
        assert workflow.get("version") == 0.4 and workflow["nodes"] and "links" in workflow, path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_runs_and_shows_its_output(fresh, server, path):
    ui = fresh
    workflow = json.loads(path.read_text())
    twin = json.loads((path.parent / "api" / path.name).read_text())
    started = time.monotonic()

    presses = ui.open_workflow_file(path)
    _check_loaded_as_in_file(ui, workflow)
    made = ui.graph_to_prompt()["output"]
    assert api_differences(made, twin, _object_info(server)) == []

    # the run variant: only a prompt model nobody can download here is swapped for the tiny VLM
    variant = run_variant(twin)
    for node in workflow["nodes"]:
        if node["type"] == PROMPT_MODEL_LOADER:
            assert TINY_VLM in ui.combo_values(node["id"], "model_name")
            ui.set_widget(node["id"], "model_name", TINY_VLM)
    assert api_differences(ui.graph_to_prompt()["output"], variant, _object_info(server)) == []
    assert INPUT_IMAGE in ui.combo_values(next(n["id"] for n in workflow["nodes"] if n["type"] == "LoadImage"),
                                          "image")
    for node in workflow["nodes"]:  # the model each loader names is one the page offers (e.g. the SD x4 folder)
        for widget in LOADER_FILES.get(node["type"], ()):
            name = made[str(node["id"])]["inputs"][widget]
            assert name in ui.combo_values(node["id"], widget), (path.name, widget, name)

    prompt_id = ui.queue_from_ui()
    events = ui.wait_for_prompt(prompt_id, timeout=240)
    executed = {e["detail"]["node"]: e["detail"]["output"] for e in events if e["type"] == "executed"}
    image_nodes = [n for n in workflow["nodes"] if n["type"] in IMAGE_NODES]
    assert image_nodes, f"{path.name} has no image output node"
    expected = EXPECTED_OUTPUTS.get(path.stem, {})
    for node in image_nodes:
        reported = executed[str(node["id"])]["images"]
        shown = ui.wait_for_node_images(node["id"], len(reported))  # decoded on the canvas
        assert len(shown) == len(reported) >= 1
        for img, item in zip(shown, reported):
            assert f"filename={item['filename']}" in img["src"].replace("%2F", "/")
        if str(node["id"]) in expected:
            count, width, height = expected[str(node["id"])]
            assert len(shown) == count
            assert all((img["width"], img["height"]) == (width, height) for img in shown), shown
    first_saved = executed[str(image_nodes[0]["id"])]["images"][0]["filename"]
    ui.show_queue_sidebar()
    rendered = ui.wait_for_rendered_img(first_saved, within=".task-item")  # an <img> in the queue panel
    assert rendered["width"] > 0
    ui.show_queue_sidebar(False)
    ui.fit_view()
    shot = ui.screenshot(ARTIFACTS / f"{path.stem}.png")
    assert shot.stat().st_size > 10_000
    print(f"{path.stem}: opened with {presses} Ctrl+O, ran and shown in {time.monotonic() - started:.1f} s")


def test_the_templates_dialog_lists_the_examples_and_opens_one(fresh, server):
    ui = fresh
    status, served = server.request("GET", "/api/workflow_templates")
    assert status == 200 and sorted(served[PACK_FOLDER]) == sorted(p.stem for p in WORKFLOWS)
    cards = ui.open_templates_dialog(PACK_FOLDER)
    ui.screenshot(ARTIFACTS / "templates_dialog.png")
    assert sorted(cards) == sorted(p.stem for p in WORKFLOWS)
    for name, card in cards.items():  # each card shows its own thumbnail, decoded (the page fetches it as a blob)
        with Image.open(REPO_ROOT / "example_workflows" / f"{name}.jpg") as im:
            assert card["thumbnail"] and card["width"] == im.width, (name, card, im.size)
    name = "upscale_bundled_x4" if "upscale_bundled_x4" in cards else sorted(cards)[0]
    ui.open_template(name)
    _check_loaded_as_in_file(ui, json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text()))
    ui.screenshot(ARTIFACTS / "templates_opened.png")


def test_the_load_checks_can_fail(fresh, tmp_path):
    """The checks above see a missing node (ComfyUI's dialog) and a widget value that changed."""
    ui = fresh
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][-1]["type"] = "DreamForgeNoSuchNode"
    bad = tmp_path / "missing_node.json"
    bad.write_text(json.dumps(workflow))
    ui.open_workflow_file(bad)
    ui.page.wait_for_selector(".comfy-missing-nodes", timeout=10_000)
    assert "DreamForgeNoSuchNode" in " ".join(ui.missing_nodes_dialog())
    assert any("missing-nodes dialog" in p for p in ui.loaded_differences(workflow))
    ui.close_dialogs()

    workflow = json.loads(WORKFLOWS[0].read_text())
    ui.open_workflow_file(WORKFLOWS[0])
    assert ui.loaded_differences(workflow) == []
    node = next(n for n in workflow["nodes"] if n["type"] == "SaveImage")
    ui.set_widget(node["id"], "filename_prefix", "changed/after_load")
    (problem,) = ui.loaded_differences(workflow)
    assert f"node {node['id']} (SaveImage)" in problem and "changed/after_load" in problem


def _pack_nodes(server) -> dict:
    info = _object_info(server)
    return {name: spec["display_name"] for name, spec in info.items()
            if spec.get("python_module", "").endswith(PACK_FOLDER)}


def test_nodes_are_added_from_the_search_box_by_display_name(fresh, server):
    """Double-click the canvas, type a node's display name, Enter: that node is added (each of the pack's)."""
    ui = fresh
    nodes = _pack_nodes(server)
    assert nodes.get("DreamForgeESRGANUpscale") == "ESRGAN Upscale (DreamForge)"
    assert len(nodes) >= 9
    for node_type, display in sorted(nodes.items()):
        before = [n["id"] for n in ui.live_nodes()]
        suggestion = ui.add_node_by_search(display, at=(700, 450))
        added = [n for n in ui.live_nodes() if n["id"] not in before]
        assert [n["type"] for n in added] == [node_type], f"typed {display!r} (first suggestion {suggestion!r}), got {added}"
        if node_type == "DreamForgeESRGANUpscale":
            ui.screenshot(ARTIFACTS / "search_box_added_node.png")
        ui.remove_node(added[0]["id"])  # keep the canvas empty where the next double-click goes
