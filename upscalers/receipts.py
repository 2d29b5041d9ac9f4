"""Typed receipts: what every run did, in one shape whatever the path (docs/receipt.schema.json).

Every receipt is a dataclass with `to_dict()` / `to_json()`, a `kind` and the `receipt_version`. Fields
are always present (None or an empty list when they do not apply), so a reader never has to ask
whether `passes` is a list or a dict. Backends report their own details (SD x4 latent tiles, the
Chain-of-Zoom model's files and dtypes) in each pass's `backend` object, free-form. The JSON Schema
under docs/ is generated from these classes (`json_schema()`), and the test suite validates every
receipt it produces against it.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

RECEIPT_VERSION = 1


class Receipt:
    """Base of the receipt family (the top-level records a node, the API or the command line returns)."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"receipt_version": RECEIPT_VERSION, "kind": self.KIND,
                **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _plain(value: Any) -> Any:
    """JSON-able form: receipts nested in receipts keep their version and kind."""
    if isinstance(value, Receipt):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ parts
@dataclass(frozen=True)
class ModelRecord:
    file: str
    sha256: Optional[str]  # first 12 hex digits, None when unknown
    architecture: str
    provenance: Optional[dict]  # where the file came from (its .dreamforge.json sidecar), None when unknown


@dataclass(frozen=True)
class PromptRecord:
    mode: str  # "text": one text for the image; "per_tile" / "per_pass": a prompt model made one per tile / pass
    text: Optional[str]  # the text (mode "text")
    used: bool  # the model is conditioned on text (GANs are not)
    note: Optional[str] = None  # e.g. why no prompt was made for a model's tiles


@dataclass(frozen=True)
class TilePrompt:
    window: list[int]  # left, top, right, bottom in the pass input's pixels
    text: str
    tile: Optional[list[int]] = None  # row, column of the driver's tile grid (None: the whole pass input)


@dataclass(frozen=True)
class PassRecord:
    index: int  # 1-based native pass
    input_size: list[int]  # width, height
    output_size: list[int]
    tiles: Optional[dict]  # the driver's tile plan (None: the backend planned its own; see backend)
    prompts: list[TilePrompt]  # the texts this pass was conditioned on (empty for unprompted models)
    backend: dict  # the backend's own report: seed, latent/VAE tiles, options, notes ({} for GANs)
    image: Optional[int] = None  # the batch image, when a batch split after out-of-memory ran one at a time


@dataclass(frozen=True)
class Resampled:
    from_scale: float
    method: str


@dataclass(frozen=True)
class FallbackStep:
    impl: str
    model: str
    result: str  # "out of memory" | "ok"
    detail: Optional[str] = None


@dataclass(frozen=True)
class Degraded:
    ran: str
    instead_of: str
    reason: str


@dataclass(frozen=True)
class Policy:
    impl: str  # what was asked (auto / gan / diffusion)
    ran: str  # what made the image
    reason: str


# ---------------------------------------------------------------------------------------- receipts
@dataclass(frozen=True)
class UpscaleReceipt(Receipt):
    KIND: ClassVar[str] = "upscale"

    impl: str  # "gan" | "diffusion" | "resample"
    model: ModelRecord
    native_scale: int
    requested_scale: float
    pass_count: int
    resampled: Optional[Resampled]
    input_size: list[int]
    output_size: list[int]
    batch: int
    alpha: Optional[str]
    dtype: str
    device: str
    passes: list[PassRecord]
    retries: list[dict]  # out-of-memory events ({"event": ..., "stage": ..., ...}) in order
    fallbacks: list[FallbackStep]
    degraded: Optional[Degraded]
    prompt: Optional[PromptRecord]
    seed: Optional[int]  # the seed given, or the one the backend drew (to reproduce the image)
    policy: Optional[Policy]
    notes: list[str]
    seconds: float
    cli: Optional[dict] = None  # the command line's settings and files


@dataclass(frozen=True)
class ZoomPrompt:
    text: str
    generated: Optional[str]
    provider: str
    images: int  # images the prompt model saw (0: no prompt model)


@dataclass(frozen=True)
class ZoomCrop:
    source: str  # "x{n-1}" or "x0"
    box: list[int]
    factor: int


@dataclass(frozen=True)
class ColorFixRecord:
    method: str
    reference: str


@dataclass(frozen=True)
class ZoomStepReceipt(Receipt):
    KIND: ClassVar[str] = "zoom_step"

    step: int
    image: int  # index in the batch
    mode: str
    magnification: int
    process_size: int
    crop: ZoomCrop
    seed: int
    sr_input_size: Optional[list[int]]
    prompt: Optional[ZoomPrompt]
    color_fix: Optional[ColorFixRecord]
    upscale: Optional[UpscaleReceipt]
    seconds: float
    sampling: Optional[str] = None  # Chain-of-Zoom's own model: "sample" | "mean"; None for other upscalers


@dataclass(frozen=True)
class ModelSummary:
    model: ModelRecord
    impl: str
    native_scale: int


@dataclass(frozen=True)
class ZoomLoopReceipt(Receipt):
    KIND: ClassVar[str] = "zoom_loop"

    mode: str
    steps: int
    process_size: int
    batch: int
    input_size: list[int]
    magnifications: list[int]
    seed: int
    prompts: list[list[str]]  # per batch image, per step
    color_fix: str
    prompt_provider: str
    upscaler: Optional[ModelSummary]
    step_receipts: list[ZoomStepReceipt]
    seconds: float
    sampling: Optional[str] = None  # Chain-of-Zoom's own model: "sample" | "mean"; None for other upscalers


@dataclass(frozen=True)
class ZoomPass:
    image: int
    index: int
    input_size: list[int]
    output_size: list[int]
    prompt_mode: str
    upscale: UpscaleReceipt


@dataclass(frozen=True)
class ZoomUpscaleReceipt(Receipt):
    KIND: ClassVar[str] = "zoom_upscale"

    requested_scale: float
    pass_count: int
    reached_scale: int
    input_size: list[int]
    output_size: list[int]
    intermediate_size: list[int]
    resampled: Optional[Resampled]
    max_side: int
    color_fix: str
    seed: int
    batch: int
    prompt_provider: str
    user_prompt: str
    alpha: Optional[str]
    passes: list[ZoomPass]
    seconds: float
    sampling: Optional[str] = None  # Chain-of-Zoom's own model: "sample" | "mean"; None for other upscalers


@dataclass(frozen=True)
class BatchReceipt(Receipt):
    """One receipt per image of a batch the node ran one image at a time (Chain-of-Zoom Step)."""

    KIND: ClassVar[str] = "batch"

    items: list[Union[ZoomStepReceipt, UpscaleReceipt]] = field(default_factory=list)


RECEIPTS = (UpscaleReceipt, ZoomStepReceipt, ZoomLoopReceipt, ZoomUpscaleReceipt, BatchReceipt)


# ------------------------------------------------------------------------------------ JSON Schema
def json_schema() -> dict:
    """The JSON Schema of every receipt (docs/receipt.schema.json is this, written by scripts/write_receipt_schema.py)."""
    defs: dict[str, dict] = {}
    top = [_ref(cls, defs) for cls in RECEIPTS]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "DreamForge Upscale receipt",
        "description": f"receipt_version {RECEIPT_VERSION}; generated from upscalers/receipts.py",
        "oneOf": top,
        "$defs": defs,
    }


def _ref(cls: type, defs: dict) -> dict:
    name = cls.__name__
    if name not in defs:
        defs[name] = {}  # placeholder against recursion
        hints = typing.get_type_hints(cls)
        props, required = {}, []
        if issubclass(cls, Receipt):
            props["receipt_version"] = {"const": RECEIPT_VERSION}
            props["kind"] = {"const": cls.KIND}
            required += ["receipt_version", "kind"]
        for f in dataclasses.fields(cls):
            props[f.name] = _schema_of(hints[f.name], defs)
            required.append(f.name)
        defs[name] = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return {"$ref": f"#/$defs/{name}"}


def _schema_of(tp: Any, defs: dict) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs) for a in typing.get_args(tp)]}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _schema_of(item, defs)}
    if dataclasses.is_dataclass(tp):
        return _ref(tp, defs)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")
