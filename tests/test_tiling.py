"""Tile planning, blend-weight normalisation and the tiled runner, with exact local 'models'."""
import pytest
import torch

from dreamforge_upscale.tiling import RunHooks, TileOOMError, plan_tiles, run_tiled
from dreamforge_upscale.tiling.memory import choose_tile
from dreamforge_upscale.tiling.plan import reflect_indices

AWKWARD = [
    # (height, width, tile, overlap, context, multiple, minimum)
    (1, 1, 64, 8, 16, 1, 0),
    (1, 517, 64, 8, 16, 1, 0),
    (517, 1, 64, 8, 16, 1, 0),
    (97, 131, 32, 8, 4, 1, 0),  # primes
    (10, 13, 64, 8, 16, 1, 0),  # smaller than a tile
    (300, 451, 128, 16, 32, 1, 0),  # non-square
    (211, 89, 48, 12, 8, 8, 16),  # size multiple + minimum
    (5, 7, 64, 8, 16, 16, 32),  # window larger than the image: reflected
    (640, 64, 100, 0, 0, 1, 0),  # zero overlap
]


def _weight_sum(plan, scale):
    rows, cols = plan.blend_weights(scale)
    total = torch.zeros(plan.rows.length * scale, plan.cols.length * scale, dtype=torch.float64)
    for r, c in plan.tiles():
        y0, x0 = plan.rows.starts[r] * scale, plan.cols.starts[c] * scale
        total[y0 : y0 + plan.rows.tile * scale, x0 : x0 + plan.cols.tile * scale] += torch.outer(rows[r], cols[c])
    return total


@pytest.mark.parametrize("h,w,tile,overlap,context,multiple,minimum", AWKWARD)
def test_plan_geometry(h, w, tile, overlap, context, multiple, minimum):
    plan = plan_tiles(h, w, tile, overlap, context, multiple, minimum)
    for axis, length in ((plan.rows, h), (plan.cols, w)):
        assert axis.starts[0] == 0 and axis.starts[-1] + axis.tile == length  # covers the axis
        assert all(b > a for a, b in zip(axis.starts, axis.starts[1:]))
        assert axis.tile <= max(tile, 1) or axis.count == 1
        if axis.count > 1:
            assert axis.min_overlap >= overlap  # at least the requested overlap
            gaps = [b - a for a, b in zip(axis.starts, axis.starts[1:])]
            assert max(gaps) - min(gaps) <= 1  # spread evenly: no thin edge tile
        assert axis.window % multiple == 0 and axis.window >= minimum
        for i, (s, ws) in enumerate(zip(axis.starts, axis.window_starts)):
            assert ws <= s and s + axis.tile <= ws + axis.window  # the core lies in its window
            if axis.window <= length:
                assert 0 <= ws and ws + axis.window <= length  # real pixels only, no padding
                # real context on each side, unless the window had to stop at the border
                assert s - ws >= min(context, s) or ws + axis.window == length
            idx = axis.window_indices(i)
            assert idx.min() >= 0 and idx.max() < length


@pytest.mark.parametrize("h,w,tile,overlap,context,multiple,minimum", AWKWARD)
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_blend_weights_sum_to_one(h, w, tile, overlap, context, multiple, minimum, scale):
    total = _weight_sum(plan_tiles(h, w, tile, overlap, context, multiple, minimum), scale)
    assert total.min() >= 0.99
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_weights_are_cos2_feather_in_overlap():
    plan = plan_tiles(1, 200, 120, 40, 0)
    rows, cols = plan.blend_weights(1)
    a, b = cols
    overlap = plan.cols.starts[0] + plan.cols.tile - plan.cols.starts[1]
    ramp = b[:overlap]
    assert torch.all(ramp[1:] > ramp[:-1])  # rises monotonically across the overlap
    assert torch.allclose(a[-overlap:] + ramp, torch.ones(overlap, dtype=torch.float64))
    pos = torch.arange(overlap, dtype=torch.float64) + 0.5
    assert torch.allclose(ramp, torch.sin(0.5 * torch.pi * pos / overlap) ** 2)


def test_square_requirement_gives_square_windows():
    plan = plan_tiles(90, 300, 64, 8, 8, multiple=8, square=True)
    assert plan.rows.window == plan.cols.window


def test_reflect_indices():
    idx = reflect_indices(torch.arange(-3, 8), 4)
    assert idx.tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]
    assert reflect_indices(torch.arange(5), 1).tolist() == [0] * 5


def _nearest(scale):
    """An exactly local 'model': nearest-neighbour upscale, any window gives the same pixels."""
    return lambda x: x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _local_blur(x):
    """A 'model' with a 3x3 receptive field and zero padding at the border, x2."""
    k = torch.ones(x.shape[1], 1, 3, 3, dtype=x.dtype) / 9
    y = torch.nn.functional.conv2d(x, k, padding=1, groups=x.shape[1])
    return y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


@pytest.mark.parametrize("h,w", [(1, 1), (37, 53), (128, 96), (7, 300)])
def test_tiled_equals_direct_for_local_model(h, w):
    torch.manual_seed(0)
    image = torch.rand(2, h, w, 3)
    direct = _nearest(3)(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    result = run_tiled(image, _nearest(3), 3, tile=16, overlap=4, context=0,
                       device=torch.device("cpu"), dtype=torch.float32)
    assert result.image.shape == (2, h * 3, w * 3, 3)
    assert torch.allclose(result.image, direct, atol=1e-6)


def test_context_makes_tiles_match_untiled_and_border_is_not_padded():
    torch.manual_seed(1)
    image = torch.rand(1, 90, 70, 3)
    direct = _local_blur(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    tiled = run_tiled(image, _local_blur, 2, tile=24, overlap=2, context=1,
                      device=torch.device("cpu"), dtype=torch.float32)
    assert tiled.plan.count > 4
    # one pixel of context is exactly the receptive field: identical everywhere, borders included
    assert torch.allclose(tiled.image, direct, atol=1e-6)
    no_context = run_tiled(image, _local_blur, 2, tile=24, overlap=2, context=0,
                           device=torch.device("cpu"), dtype=torch.float32)
    assert (no_context.image - direct).abs().max() > 1e-3  # the test can fail: context matters


def test_out_of_memory_halves_tile_and_records_retry():
    calls = []

    def picky(x):
        calls.append(tuple(x.shape[-2:]))
        if max(x.shape[-2:]) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _nearest(2)(x)

    image = torch.rand(1, 100, 100, 3)
    result = run_tiled(image, picky, 2, tile=128, overlap=4, context=2, device=torch.device("cpu"),
                       dtype=torch.float32, floor=16)
    assert result.retries == [{"event": "out_of_memory", "stage": "tiles", "tile": 100, "retry_tile": 50,
                               "allocator": "CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert result.plan.count > 1 and max(result.plan.rows.window, result.plan.cols.window) <= 40
    assert torch.allclose(result.image, _nearest(2)(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def test_cpu_allocation_failure_counts_as_oom_and_floor_raises():
    def never_fits(x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(TileOOMError, match="lower 'tile'"):
        run_tiled(torch.rand(1, 64, 64, 3), never_fits, 2, tile=64, overlap=4, context=0,
                  device=torch.device("cpu"), dtype=torch.float32, floor=16)


def test_other_errors_are_not_swallowed():
    def broken(x):
        raise ValueError("weights are corrupt")

    with pytest.raises(ValueError, match="corrupt"):
        run_tiled(torch.rand(1, 64, 64, 3), broken, 2, tile=32, overlap=4, context=0,
                  device=torch.device("cpu"), dtype=torch.float32)


def test_interrupt_between_tiles_and_progress_per_tile():
    seen = []

    class Stop(Exception):
        pass

    def check():
        if len(seen) >= 3:
            raise Stop()

    hooks = RunHooks(progress=lambda done, total: seen.append((done, total)), check_interrupt=check)
    with pytest.raises(Stop):
        run_tiled(torch.rand(1, 64, 64, 3), _nearest(2), 2, tile=16, overlap=2, context=0,
                  device=torch.device("cpu"), dtype=torch.float32, hooks=hooks)
    total = seen[0][1]
    assert total > 3 and seen == [(1, total), (2, total), (3, total)]


def test_choose_tile():
    assert choose_tile(100, 100, 1, bytes_per_pixel=100, budget=10**6, context=8) == 0  # fits: untiled
    tile = choose_tile(4000, 4000, 1, bytes_per_pixel=1000, budget=10**9, context=32)
    assert 0 < tile < 4000 and tile % 32 == 0
    assert (tile + 64) ** 2 * 1000 <= 10**9
    assert choose_tile(4000, 4000, 2, 1000, 10**9, 32) < tile  # a batch needs smaller tiles


def test_seam_free_on_smooth_image_with_imperfect_model():
    """Tiles that disagree (a per-window brightness offset) must blend without a visible step."""
    def biased(x):
        return _nearest(2)(x) + 0.2 * x.mean()

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 120), torch.linspace(0, 1, 160), indexing="ij")
    image = torch.stack([yy, xx, (yy + xx) / 2], dim=-1)[None]

    def max_step(overlap):
        out = run_tiled(image, biased, 2, tile=48, overlap=overlap, context=0, device=torch.device("cpu"),
                        dtype=torch.float32).image
        return steps(out)

    def steps(out):
        return max((out[:, :, 1:] - out[:, :, :-1]).abs().amax(), (out[:, 1:] - out[:, :-1]).abs().amax())

    intrinsic = steps(_nearest(2)(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    assert max_step(0) > intrinsic + 0.005  # hard cuts between tiles step visibly
    assert max_step(16) < intrinsic + 0.002  # the cos^2 feather spreads the disagreement out
