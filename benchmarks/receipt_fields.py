"""The receipt fields the benchmarks print (tile plan, dtype, a pass's backend report), read from either
receipt shape: the typed UpscaleReceipt (upscalers/receipts.py: `passes[i].tiles`, `.backend`) or the
plain dict of earlier commits (`tile_plan`), so a benchmark can be rerun on an older checkout to compare.
"""
from __future__ import annotations


def as_dict(receipt) -> dict:
    return receipt.to_dict() if hasattr(receipt, "to_dict") else receipt


def first_pass(receipt) -> dict:
    """The first native pass: its driver tile plan (`tiles`) and its backend report (`backend`)."""
    d = as_dict(receipt)
    if "tile_plan" in d:  # older dict receipts: one flat plan, the backend's own fields mixed in
        plan = d["tile_plan"][0] if isinstance(d["tile_plan"], list) else d["tile_plan"]
        return {"tiles": plan, "backend": plan}
    passes = d.get("passes") or [{}]
    return {"tiles": passes[0].get("tiles"), "backend": passes[0].get("backend") or {}}


def tile_plan(receipt) -> dict | None:
    """The driver's tile plan of the first pass (count, tile, grid, window, overlap); None when the backend
    planned its own tiles."""
    return first_pass(receipt)["tiles"]


def dtype(receipt) -> str:
    return as_dict(receipt)["dtype"]
