"""tiling/cost.py (which plan), tile batching in tiling/runner.py, and the fidelity of the plans it picks."""
import os
from pathlib import Path

import pytest
import torch
from skimage import data

from dreamforge_upscale.tiling import RunHooks, TileOOMError, plan_tiles, run_tiled
from dreamforge_upscale.tiling.cost import (
    CPU_REUSE_FACTOR, REUSE_OFF_SLOWDOWN, ArchCost, CPU_COSTS, candidate_tiles, choose_plan, costs_for, max_tiles_per_call,
    plan_memory, plan_seconds,
)
from dreamforge_upscale.upscalers import GANUpscaler, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path

WEIGHTS = Path(os.environ.get("DF_SHARED_WEIGHTS", Path(__file__).resolve().parents[2] / "shared" / "weights"))
X4PLUS = WEIGHTS / "RealESRGAN_x4plus.pth"
CPU = torch.device("cpu")
GEOMETRY = dict(batch=1, scale=4, context=32, overlap=16)


def brute_force(height, width, cost, bpp, budget):
    """Every candidate plan that fits, scored by the same formula: the reference for choose_plan."""
    fits = []
    for tile in candidate_tiles(height, width):
        plan = plan_tiles(height, width, tile, 16, 32)
        if plan_memory(plan, bpp, 1) <= budget:
            fits.append((plan_seconds(plan, cost, 1, 4), plan))
    return min(fits, key=lambda f: f[0])


def test_one_tile_when_it_fits():
    choice = choose_plan(700, 500, bytes_per_pixel=768, budget=10**12, cost=CPU_COSTS["Compact"], **GEOMETRY)
    assert choice.tile == 0 and choice.plan.untiled


@pytest.mark.parametrize("budget_px", [300 * 300, 420 * 420, 610 * 610])
def test_choice_is_the_cheapest_plan_that_fits(budget_px):
    cost, bpp = CPU_COSTS["ESRGAN"], 12288.0
    choice = choose_plan(1000, 760, bytes_per_pixel=bpp, budget=int(budget_px * bpp), cost=cost, **GEOMETRY)
    best_seconds, _ = brute_force(1000, 760, cost, bpp, budget_px * bpp)
    assert choice.memory <= budget_px * bpp and not choice.plan.untiled
    assert choice.seconds == pytest.approx(best_seconds)


def test_the_plan_follows_the_cost_model():
    """Same image and memory, tiles batched up to 8 per call: when pixels cost, the fewest pixels (9 big
    windows, one per call); when calls cost (a GPU's launches), the fewest calls (more, smaller windows
    batched). The choice comes from the costs, not from a fixed tile size."""
    bpp, budget = 1000.0, 560 * 560 * 1000
    kw = dict(bytes_per_pixel=bpp, budget=budget, max_tiles_per_call=8, **GEOMETRY)
    by_pixels = choose_plan(1000, 1000, cost=ArchCost(0.0, 1e-6), **kw)
    by_calls = choose_plan(1000, 1000, cost=ArchCost(1.0, 1e-9), **kw)
    windows = lambda c: c.plan.count * c.plan.rows.window * c.plan.cols.window  # noqa: E731
    calls = lambda c: -(-c.plan.count // c.tiles_per_call)  # noqa: E731
    assert windows(by_pixels) < windows(by_calls) and calls(by_calls) < calls(by_pixels)
    assert by_calls.tiles_per_call > 1 and by_calls.memory <= budget and by_pixels.memory <= budget


def test_nothing_fits_gives_the_smallest_plan_for_the_retry_to_take_over():
    choice = choose_plan(900, 900, bytes_per_pixel=1e6, budget=1, cost=CPU_COSTS["Compact"], **GEOMETRY)
    assert choice.memory == min(plan_memory(plan_tiles(900, 900, t, 16, 32), 1e6, 1)
                                for t in candidate_tiles(900, 900))


def test_batching_only_on_gpu_and_within_memory():
    assert max_tiles_per_call(CPU) == 1 and max_tiles_per_call(torch.device("cuda")) > 1
    assert max_tiles_per_call(torch.device("cuda"), per_tile=lambda *a: None) == 1
    gpu = ArchCost(per_call=1.0, per_pixel=1e-9)  # launches dominate: batching pays
    plan_budget = plan_memory(plan_tiles(1000, 1000, 256, 16, 32), 100.0, 1)
    choice = choose_plan(1000, 1000, bytes_per_pixel=100.0, budget=3 * plan_budget, cost=gpu,
                         max_tiles_per_call=8, **GEOMETRY)
    assert 1 < choice.tiles_per_call and choice.memory <= 3 * plan_budget


def test_unknown_architectures_scale_by_memory_per_pixel():
    small, big = costs_for("SwinIR", CPU, 3072.0), costs_for("SwinIR", CPU, 24576.0)
    assert big.per_pixel == pytest.approx(8 * small.per_pixel)
    assert costs_for("Compact", "cuda", 768.0) != costs_for("Compact", CPU, 768.0)


# ------------------------------------------------------------------------------------- tile batching
def _nearest(scale):
    return lambda x: torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")


def test_batched_tiles_give_the_same_image_with_fewer_calls():
    image = torch.rand(2, 70, 90, 3)
    calls = {1: 0, 4: 0}

    def counted(k):
        def fn(x):
            calls[k] += 1
            return _nearest(2)(x)
        return fn

    one = run_tiled(image, counted(1), 2, tile=24, overlap=4, context=3, device=CPU, dtype=torch.float32)
    four = run_tiled(image, counted(4), 2, tile=24, overlap=4, context=3, device=CPU, dtype=torch.float32,
                     tiles_per_call=4)
    assert torch.equal(one.image, four.image)
    assert calls[1] == one.plan.count and calls[4] == -(-one.plan.count // 4)


def test_out_of_memory_in_a_batched_call_halves_the_batch_then_the_tile_in_bounded_calls():
    calls = []

    def big_batches_fail(x):
        calls.append(x.shape[0])
        if x.shape[0] > 1:  # image batch is 1: more than one window per call does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _nearest(2)(x)

    result = run_tiled(torch.rand(1, 64, 64, 3), big_batches_fail, 2, tile=16, overlap=2, context=0, device=CPU,
                       dtype=torch.float32, tiles_per_call=8)
    batch_events = [r for r in result.retries if r["stage"] == "tile batch"]
    assert [r["tiles_per_call"] for r in batch_events] == [8, 4, 2]
    assert calls[:3] == [8, 4, 2] and all(c == 1 for c in calls[3:])
    assert len(calls) == 3 + result.plan.count  # the failed attempts, then one call per tile

    always = []

    def never_fits(x):
        always.append(x.shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(TileOOMError):
        run_tiled(torch.rand(1, 64, 64, 3), never_fits, 2, tile=64, overlap=2, context=0, device=CPU,
                  dtype=torch.float32, tiles_per_call=8, floor=16)
    assert len(always) <= 12  # per tile size: log2(8) batch halvings at most, then the tile halves


# ------------------------------------------------------------------------- fidelity of chosen plans
def _photo(h, w):
    return torch.from_numpy(data.astronaut()[100 : 100 + h, 150 : 150 + w].copy()).float().div(255)[None]


def _tight(upscaler, side):
    """A host budget that lets only windows of about side x side through, even with memory reuse off (the
    planner may trade reuse for one tile: the image must not fit whole either way; the canvas comes off first)."""
    caps = upscaler.capabilities
    return lambda device: int((side * side * caps.bytes_per_pixel + 10 * 2**20) / 0.6)


def test_compact_plan_from_the_cost_model_matches_untiled_within_1_255():
    model = GANUpscaler.load(bundled_model_path())
    image = _photo(150, 190)
    untiled, r0 = upscale(model, image)
    tiled, r1 = upscale(model, image, hooks=RunHooks(free_bytes=_tight(model, 120)))
    assert r0.passes[0].tiles["count"] == 1 and r1.passes[0].tiles["count"] > 1
    assert (tiled - untiled).abs().max() <= 1 / 255


@pytest.mark.skipif(not X4PLUS.is_file(), reason=f"real RealESRGAN_x4plus weights not found at {X4PLUS}")
def test_rrdb_plan_from_the_cost_model_matches_untiled_within_3_255():
    model = GANUpscaler.load(X4PLUS)
    image = _photo(48, 240)  # wide enough for tiles plus ESRGAN's 64 px of context on each side
    untiled, _ = upscale(model, image)
    tiled, r1 = upscale(model, image, hooks=RunHooks(free_bytes=_tight(model, 98)))
    assert r1.passes[0].tiles["count"] > 1
    assert (tiled - untiled).abs().max() <= 3 / 255


def _pixels_read(choice):
    return choice.plan.count * choice.plan.rows.window * choice.plan.cols.window


@pytest.mark.parametrize("arch,bpp,context", [("Compact", 768.0, 32), ("ESRGAN", 12288.0, 64)])
def test_cpu_choice_does_not_hinge_on_the_calibrated_constants(arch, bpp, context):
    """The CPU constants came from a few photos on a loaded machine; the plan must not depend on them.
    Over shapes nothing was tuned on and budgets from roomy to tight, a 10x error in per_call or blending
    (either way) and a 4x error in per_pixel leave the chosen plan reading within 3% of the same pixels."""
    base = CPU_COSTS[arch]
    skewed = [ArchCost(base.per_call * f, base.per_pixel, base.blend_per_pixel) for f in (0.1, 10.0)]
    skewed += [ArchCost(base.per_call, base.per_pixel, base.blend_per_pixel * f) for f in (0.1, 10.0)]
    skewed += [ArchCost(base.per_call, base.per_pixel * f, base.blend_per_pixel) for f in (0.25, 4.0)]
    geometry = dict(batch=1, scale=4, context=context, overlap=16, bytes_per_pixel=bpp)
    for height, width in ((427, 640), (872, 1000), (1411, 1411), (500, 741)):
        for budget_side in (2000, 700, 400, 256):
            budget = int(budget_side * budget_side * bpp)
            ref = choose_plan(height, width, budget=budget, cost=base, **geometry)
            for cost in skewed:
                other = choose_plan(height, width, budget=budget, cost=cost, **geometry)
                assert _pixels_read(other) <= 1.03 * _pixels_read(ref), (height, width, budget_side, cost)
                assert _pixels_read(ref) <= 1.03 * _pixels_read(other), (height, width, budget_side, cost)


def test_memory_tight_cpu_runs_one_tile_without_reuse_rather_than_tiles_with_it():
    """Heap reuse doubles a pass's memory; when only that stops one tile from fitting, giving up reuse
    (REUSE_OFF_SLOWDOWN) costs less than tiles that re-read 64 px of context on every side."""
    bpp, cost = 12288.0, CPU_COSTS["ESRGAN"]
    kw = dict(batch=1, scale=4, context=64, overlap=16, bytes_per_pixel=bpp, cost=cost, reuse_factor=CPU_REUSE_FACTOR)
    one_tile = 500 * 741 * bpp
    tight = choose_plan(500, 741, budget=int(1.2 * one_tile), **kw)
    assert tight.plan.untiled and not tight.reuse and tight.memory <= 1.2 * one_tile
    roomy = choose_plan(500, 741, budget=int(2.1 * one_tile), **kw)
    assert roomy.plan.untiled and roomy.reuse and roomy.memory == pytest.approx(CPU_REUSE_FACTOR * one_tile, rel=1e-6)
    # a big image where tiles re-read little context: tiles with reuse beat one tile without it
    big = choose_plan(2400, 2400, budget=int(1.1 * 2400 * 2400 * bpp), **kw)
    assert big.reuse and not big.plan.untiled
    assert big.seconds < REUSE_OFF_SLOWDOWN * plan_seconds(plan_tiles(2400, 2400, 0, 16, 64), cost, 1, 4)


def test_reuse_scoring_picks_the_cheapest_of_both_modes():
    bpp, cost = 12288.0, CPU_COSTS["ESRGAN"]
    for height, width, budget_side in ((500, 741, 600), (872, 1000, 900), (1411, 1411, 800)):
        budget = int(budget_side * budget_side * bpp)
        choice = choose_plan(height, width, batch=1, scale=4, context=64, overlap=16, bytes_per_pixel=bpp,
                             budget=budget, cost=cost, reuse_factor=CPU_REUSE_FACTOR)
        best = min(
            slowdown * plan_seconds(plan, cost, 1, 4)
            for tile in candidate_tiles(height, width)
            for plan in [plan_tiles(height, width, tile, 16, 64)]
            for factor, slowdown in ((CPU_REUSE_FACTOR, 1.0), (1.0, REUSE_OFF_SLOWDOWN))
            if plan_memory(plan, bpp * factor, 1) <= budget
        )
        assert choice.seconds == pytest.approx(best) and choice.memory <= budget
