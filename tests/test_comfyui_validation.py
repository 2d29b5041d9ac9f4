"""Queue-time validation through the real server: for every pack node in /object_info, every widget
input refuses an out-of-range number or an unknown choice with HTTP 400 naming that input, before any
work; and the server keeps serving afterwards."""
from __future__ import annotations

import json

import pytest

from comfy_headless import ComfyServer  # noqa: E402 - conftest puts scripts/ on sys.path

# A producer for each link type a pack node takes, and a consumer that makes each output reachable
# from an output node (ComfyUI validates only what an output node needs).
PRODUCERS = {
    "IMAGE": ("LoadImage", {"image": "coffee_64.png"}, 0),
    "UPSCALER": ("DreamForgeLoadUpscaler", {"model_name": "realesr-animevideov3.pth", "impl": "auto", "dtype": "auto"}, 0),
    "UPSCALE_MODEL": ("UpscaleModelLoader", {"model_name": "realesr-animevideov3.pth"}, 0),
    "UPSCALER,UPSCALE_MODEL": ("DreamForgeLoadUpscaler", {"model_name": "realesr-animevideov3.pth", "impl": "auto",
                                                          "dtype": "auto"}, 0),
    "STRING": ("DreamForgeTestSaveText", None, None),  # never needed as an input here
}


def _link_input(graph: dict, kind: str) -> list:
    if kind == "PROMPT_MODEL":  # a prompt model of any kind the pack has; errors upstream do not matter here
        node = str(len(graph) + 100)
        graph[node] = {"class_type": "DreamForgeLoadPromptModel",
                       "inputs": {"model_name": "none", "dtype": "auto", "max_new_tokens": 8, "temperature": 0.0}}
        return [node, 0]
    cls, inputs, index = PRODUCERS[kind]
    node = str(len(graph) + 100)
    graph[node] = {"class_type": cls, "inputs": dict(inputs)}
    return [node, index]


def _consume(graph: dict, node: str, output_type: str) -> None:
    sink = str(len(graph) + 200)
    if output_type == "IMAGE":
        graph[sink] = {"class_type": "PreviewImage", "inputs": {"images": [node, 0]}}
    elif output_type == "STRING":
        graph[sink] = {"class_type": "DreamForgeTestSaveText", "inputs": {"text": [node, 0], "filename_prefix": "v"}}
    elif output_type in ("UPSCALER", "UPSCALE_MODEL"):
        image = _link_input(graph, "IMAGE")
        graph[sink] = {"class_type": "DreamForgeESRGANUpscale", "inputs": {
            "image": image, "upscale_model": [node, 0], "scale": 0.0, "tile": 0, "overlap": 16, "resample": "lanczos"}}
        graph[str(len(graph) + 300)] = {"class_type": "PreviewImage", "inputs": {"images": [sink, 0]}}
    elif output_type == "PROMPT_MODEL":
        image = _link_input(graph, "IMAGE")
        graph[sink] = {"class_type": "DreamForgePromptFromImage", "inputs": {
            "prompt_model": [node, 0], "image": image, "max_new_tokens": 8, "temperature": 0.0, "seed": 0}}
        _consume(graph, sink, "STRING")
    else:
        raise AssertionError(f"no consumer for {output_type}: extend the test")


def _widget(spec) -> tuple[str, dict]:
    kind = spec[0]
    return kind, (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def _graph_for(name: str, info: dict) -> tuple[dict, dict]:
    """The node (id "1") with every required input at its default / linked, reachable from an output."""
    graph: dict = {}
    inputs, widgets = {}, {}
    for input_name, spec in info["input"]["required"].items():
        kind, options = _widget(spec)
        if isinstance(kind, list):
            inputs[input_name] = widgets[input_name] = options.get("default", kind[0] if kind else "none")
        elif kind in ("INT", "FLOAT", "BOOLEAN") or (kind == "STRING" and not options.get("forceInput")):
            inputs[input_name] = widgets[input_name] = options.get("default", "" if kind == "STRING" else 0)
        else:
            inputs[input_name] = _link_input(graph, kind)
    graph["1"] = {"class_type": name, "inputs": inputs}
    if not info.get("output_node"):
        _consume(graph, "1", info["output"][0])
    return graph, widgets


def _bad_values(info: dict) -> list[tuple[str, object]]:
    bad = []
    for input_name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
        kind, options = _widget(spec)
        if isinstance(kind, list):
            bad.append((input_name, "bogus-choice"))
        elif kind in ("INT", "FLOAT"):
            if "max" in options:
                bad.append((input_name, options["max"] * 2 + 1))
            if "min" in options and options["min"] > -(2**53):
                bad.append((input_name, options["min"] - 1))
    return bad


def _errors_for(body: dict, node: str, input_name: str) -> list[dict]:
    errors = (body.get("node_errors") or {}).get(node, {}).get("errors", [])
    return [e for e in errors if input_name in json.dumps(e)]


def test_every_pack_node_refuses_out_of_range_and_unknown_values(comfy):
    nodes = {k: v for k, v in comfy.object_info().items() if k.startswith("DreamForge") and not k.startswith("DreamForgeTest")}
    assert len(nodes) >= 10, sorted(nodes)
    checked = []
    for name, info in sorted(nodes.items()):
        graph, _ = _graph_for(name, info)
        _, baseline = comfy.post_prompt(graph)
        for input_name, value in _bad_values(info):
            if baseline and _errors_for(baseline, "1", input_name):
                continue  # already refused as built (e.g. an empty model list): not this input's range check
            bad = json.loads(json.dumps(graph))
            bad["1"]["inputs"][input_name] = value
            status, body = comfy.post_prompt(bad)
            assert status == 400, (name, input_name, value, body)
            assert _errors_for(body, "1", input_name), (name, input_name, value, body)
            checked.append((name, input_name))
    per_node = {name for name, _ in checked}
    assert {"DreamForgeTiledUpscale", "DreamForgeESRGANUpscale", "DreamForgeSDX4Upscale",
            "DreamForgeCoZUpscale", "DreamForgeColorFix"} <= per_node, sorted(per_node)
    assert ("DreamForgeTiledUpscale", "scale") in checked and ("DreamForgeTiledUpscale", "impl") in checked


@pytest.mark.parametrize("change, phrase", [
    ({"scale": 1000.0}, "scale"),
    ({"impl": "bogus"}, "impl"),
    ({"impl": "diffusion", "scale": 2.0, "strict_scale": True}, "strict_scale"),
])
def test_tiled_upscale_keeps_comfyuis_checks_and_adds_its_own(comfy, change, phrase):
    info = comfy.object_info("DreamForgeTiledUpscale")
    graph, _ = _graph_for("DreamForgeTiledUpscale", info)
    graph["1"]["inputs"].update(change)
    status, body = comfy.post_prompt(graph)
    assert status == 400, body
    assert _errors_for(body, "1", phrase), body
    entry = comfy.run(_plain_upscale(), timeout=120)  # the server keeps serving
    assert ComfyServer.outcome(entry) == "success"


def _plain_upscale() -> dict:
    graph, _ = _graph_for("DreamForgeColorFix", {"input": {"required": {
        "image": ["IMAGE"], "reference": ["IMAGE"], "method": [["wavelet", "adain"], {"default": "adain"}]}},
        "output": ["IMAGE"]})
    return graph
