"""Compare a node's /object_info entry with a saved one: what a saved workflow or an API client depends on
(ids, input names, order, types, defaults, ranges, choices, tooltips, outputs). Used by test_comfyui_v3.py."""
from __future__ import annotations

# Option keys a saved workflow or the UI's widgets depend on; a missing `multiline` means a one-line widget.
COMPARED_OPTIONS = ("default", "min", "max", "step", "round", "multiline", "control_after_generate", "tooltip",
                    "forceInput", "dynamicPrompts")
# Keys the V3 port may add: newer servers read them, 0.3.75's frontend ignores them.
ALLOWED_NEW_OPTIONS = {"advanced"}
NODE_FIELDS = ("name", "display_name", "category", "description", "output", "output_is_list", "output_name",
               "output_tooltips", "output_node", "input_order")
# Choice lists read from the model folders: only what the saved server listed must still be listed.
FOLDER_CHOICES = {
    ("DreamForgeLoadUpscaler", "model_name"), ("DreamForgeLoadPromptModel", "model_name"),
    ("DreamForgeLoadTagger", "ram_model"), ("DreamForgeLoadTagger", "dape"),
    *(("DreamForgeLoadCoZModel", name) for name in ("base_model", "transformer_lora", "vae_lora", "clip_l",
                                                    "clip_g", "t5xxl")),
}


def _options(spec: list) -> dict:
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    options.setdefault("multiline", False)
    return options


# Inputs added since the snapshot on purpose. Each must be optional, have a default and be the last widget
# of its node (links may follow), so a saved workflow without it loads: the UI format stores widget values
# by position, the API format by name; both then get the default.
ADDED_OPTIONAL = {
    ("DreamForgeCoZStep", "sampling"), ("DreamForgeCoZLoop", "sampling"), ("DreamForgeCoZUpscale", "sampling"),
    ("DreamForgeTiledUpscale", "sampling"),
}


def _without_added(node: str, order: dict | None) -> dict | None:
    if not order:
        return order
    return {section: [n for n in names if (node, n) not in ADDED_OPTIONAL] for section, names in order.items()}


def _added_problems(node: str, new: dict) -> list[str]:
    problems = []
    optional = new["input"].get("optional", {})
    for n, name in sorted(ADDED_OPTIONAL):
        if n != node:
            continue
        spec = optional.get(name)
        if spec is None:
            continue
        if "default" not in _options(spec):
            problems.append(f"{node}.optional.{name}: must be an optional input with a default")
            continue
        order = new.get("input_order", {}).get("optional", [])
        later_widgets = [o for o in order[order.index(name) + 1:] if isinstance(optional[o][0], list)
                         or optional[o][0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        if later_widgets:
            problems.append(f"{node}.optional.{name}: widgets after it ({later_widgets}) shift saved values")
    return problems


def input_differences(node: str, old: dict, new: dict) -> list[str]:
    """Each way `new` (one node's /object_info) differs from `old` in what a saved workflow depends on."""
    problems = [f"{node}.{field}: {old.get(field)!r} -> {new.get(field)!r}" for field in NODE_FIELDS
                if (old.get(field) != new.get(field) if field != "input_order" else
                    _without_added(node, old.get(field)) != _without_added(node, new.get(field)))]
    problems += _added_problems(node, new)
    for section in ("required", "optional"):
        old_inputs, new_inputs = old["input"].get(section, {}), new["input"].get(section, {})
        for name in old_inputs.keys() | new_inputs.keys():
            where = f"{node}.{section}.{name}"
            if section == "optional" and name not in old_inputs and (node, name) in ADDED_OPTIONAL:
                continue
            if name not in old_inputs or name not in new_inputs:
                problems.append(f"{where}: {'added' if name in new_inputs else 'removed'}")
                continue
            problems += _spec_differences(where, (node, name) in FOLDER_CHOICES, old_inputs[name], new_inputs[name])
    return problems


def _spec_differences(where: str, folder_choices: bool, old: list, new: list) -> list[str]:
    problems = []
    old_type, new_type = old[0], new[0]
    if isinstance(old_type, list) != isinstance(new_type, list):
        problems.append(f"{where}: type {old_type!r} -> {new_type!r}")
    elif isinstance(old_type, list):
        missing = [c for c in old_type if c not in new_type]
        if folder_choices and missing:
            problems.append(f"{where}: choices no longer listed: {missing}")
        elif not folder_choices and old_type != new_type:
            problems.append(f"{where}: choices {old_type} -> {new_type}")
    elif old_type != new_type:
        problems.append(f"{where}: type {old_type!r} -> {new_type!r}")
    old_options, new_options = _options(old), _options(new)
    for key in COMPARED_OPTIONS:
        if old_options.get(key) != new_options.get(key) and not (folder_choices and key == "default"):
            problems.append(f"{where}: {key} {old_options.get(key)!r} -> {new_options.get(key)!r}")
    unexpected = set(new_options) - set(old_options) - ALLOWED_NEW_OPTIONS - set(COMPARED_OPTIONS)
    if unexpected:
        problems.append(f"{where}: new option keys {sorted(unexpected)}")
    return problems
