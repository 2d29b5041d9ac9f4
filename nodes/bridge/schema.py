"""The V3 node API ComfyUI 0.3.75 and newer servers both accept: `io`, `ui`, `ComfyExtension` from the pinned
comfy_api.v0_0_2, our socket types, and the few schema helpers 0.3.75 needs (aliases, advanced inputs, checked
combos, the declared-input checks a validate_inputs would switch off)."""
from __future__ import annotations

import dataclasses
import logging

from comfy_api.v0_0_2 import ComfyExtension, io, ui  # pinned: `latest` is marked unstable  # noqa: F401

from ...runtime.errors import UpscalerError
from ...upscalers.impl_policy import default_impl

log = logging.getLogger("dreamforge_upscale")

UPSCALER = io.Custom("UPSCALER")
PROMPT_MODEL = io.Custom("PROMPT_MODEL")


def schema(*, aliases: tuple[str, ...] = (), **fields) -> io.Schema:
    """io.Schema, with search aliases where this ComfyUI reads them (0.3.75's Schema has no such
    field and would refuse the keyword; newer servers list the node under each alias)."""
    if aliases and "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        fields["search_aliases"] = list(aliases)
    return io.Schema(**fields)


def advanced(widget: io.Input) -> io.Input:
    """Mark an input as advanced (behind the UI's advanced toggle) the way newer servers emit it:
    "advanced": true in /object_info. 0.3.75's inputs take no such argument, so it travels in
    extra_dict, which every version copies into the input's options (newer ones let it win over their own
    `advanced` argument, with the same value); 0.3.75's frontend ignores the key."""
    widget.extra_dict = {**widget.extra_dict, "advanced": True}
    return widget


class Choice(io.Combo.Input):
    """A combo declared by its list of choices, as V1 did. ComfyUI 0.3.75 checks a queued value against
    the list only when the input's type IS the list (execution.py validate_inputs); io.Combo's "COMBO"
    type with an "options" key would be accepted unchecked there. Every frontend reads this form."""

    def get_io_type(self):
        return list(self.options)

    def as_dict(self):
        spec = super().as_dict()
        spec.pop("options", None)
        spec.pop("multiselect", None)
        return spec


def declared_input_errors(node_cls: type[io.ComfyNode], values: dict) -> dict[str, str]:
    """ComfyUI's own checks (choices, number type, min/max) on widget values, read from the node's V3
    schema: {input: problem}. A validate_inputs that names an input switches those checks off for it.
    A value of None (a linked input) is checked at run time instead."""
    inputs = {i.id: i for i in node_cls.define_schema().inputs}
    problems = {}
    for name, value in values.items():
        spec = inputs.get(name)
        if value is not None and spec is not None and (problem := _widget_error(spec, value)):
            problems[name] = f"{name}: {problem}"
    return problems


def _widget_error(spec: io.Input, value) -> str | None:
    if isinstance(spec, io.Combo.Input):
        return None if value in spec.options else f"{value!r} is not one of {', '.join(map(str, spec.options))}"
    if isinstance(spec, io.Boolean.Input):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if spec.min is not None and value < spec.min:
            return f"{value} is smaller than the minimum {spec.min}"
        if spec.max is not None and value > spec.max:
            return f"{value} is bigger than the maximum {spec.max}"
    return None


def default_impl_choice() -> str:
    """The default of Tiled Upscale's impl policy: DREAMFORGE_DEFAULT_IMPL, or auto with a warning when it is
    misspelt (the node list must still load). Load Upscaler's impl always defaults to auto."""
    try:
        return default_impl()
    except UpscalerError as exc:
        log.warning("DreamForge: %s; using 'auto'", exc)
        return "auto"
