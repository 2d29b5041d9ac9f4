"""One backend call through the upscaler contract, for tests that look at a single window."""
from __future__ import annotations

from dreamforge_upscale.tiling import RunHooks
from dreamforge_upscale.upscalers.contract import Conditioning


def window(model, x, prompt=None, seed=None, options=None, hooks=None, report=None, memo=None):
    """model.upscale_window(x, Conditioning(prompt, seed, options), hooks).image; `report` (a dict) receives
    the backend's report."""
    cond = Conditioning(prompt, seed, options) if memo is None else Conditioning(prompt, seed, options, memo)
    result = model.upscale_window(x, cond, hooks or RunHooks())
    if report is not None:
        report.update(result.report)
    return result.image
