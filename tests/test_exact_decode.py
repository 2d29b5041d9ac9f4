"""The one-pass exact tiled VAE decode: GroupNorm sums shared across windows, the middle
attention over the whole latent; equal to the untiled decode, and every failure path bounded."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import tiny_sdx4
from dreamforge_upscale.tiling import RunHooks
from dreamforge_upscale.tiling.exact_decode import decode_exact, owned, whole_attention_pays
from dreamforge_upscale.tiling.plan import plan_tiles
from dreamforge_upscale.tiling.vae_tiles import decode_tiled

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vae():
    _, vae, _ = tiny_sdx4.build_components(0)
    return vae.eval()


@pytest.fixture(scope="module")
def latent():
    torch.manual_seed(0)
    return torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16), size=(48, 64), mode="bicubic") * 3 + 1


def run_of(vae):
    def run(w):
        return (vae.decode(w, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
    return run


def norms_of(vae):
    return [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]


def left_behind(vae) -> list:
    return [m for m in vae.decoder.modules() if "forward" in m.__dict__]


def test_owned_regions_partition_each_axis():
    for length, tile, overlap in ((64, 16, 8), (301, 100, 8), (48, 48, 0)):
        plan = plan_tiles(length, length, tile, overlap, context=16)
        parts = owned(plan.rows)
        assert parts[0][0] == 0 and parts[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        for i, (a, b) in enumerate(parts):  # inside the tile's own core, at least overlap/2 from its window edge
            start, end = plan.rows.starts[i], plan.rows.starts[i] + plan.rows.tile
            assert start <= a < b <= end


def test_one_pass_equals_the_untiled_decode(vae, latent):
    run, norms = run_of(vae), norms_of(vae)
    attention = vae.decoder.mid_block.attentions[0]
    with torch.inference_mode():
        whole = run(latent).permute(0, 2, 3, 1)
        exact = decode_tiled(run, norms, latent, scale=4, tile=16, overlap=8, pad=16, device=CPU,
                             dtype=torch.float32, one_pass=True, attention=attention)
        windowed = decode_tiled(run, norms, latent, scale=4, tile=16, overlap=8, pad=16, device=CPU,
                                dtype=torch.float32, one_pass=True)
        stats_pass = decode_tiled(run, norms, latent, scale=4, tile=16, overlap=8, pad=16, device=CPU,
                                  dtype=torch.float32)
    assert exact.plan.count > 1 and exact.image.shape == whole.shape
    assert (exact.image - whole).abs().max().item() <= 1e-4  # both exact parts on: the untiled decode
    assert exact.statistics == {"side": 64, "exact": True, "one_pass": True, "attention": "whole"}
    assert windowed.statistics["attention"] == "windowed" and windowed.statistics["one_pass"]
    # windowed attention is the only approximation left: no worse than the statistics pass, which also windows it
    err_windowed = (windowed.image - whole).abs().mean().item()
    assert 0 < err_windowed <= (stats_pass.image - whole).abs().mean().item() + 1e-6
    assert stats_pass.statistics["one_pass"] is False
    assert not left_behind(vae)


class FakeOOM(RuntimeError):
    pass


def test_out_of_memory_in_one_pass_falls_back_to_the_statistics_pass(vae, latent):
    run, norms = run_of(vae), norms_of(vae)
    calls = []

    def failing(w):
        calls.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("vae-window") and len(calls) == 3:
            raise FakeOOM("CUDA out of memory (injected)")
        return run(w)

    with torch.inference_mode():
        whole = run(latent).permute(0, 2, 3, 1)
        result = decode_tiled(failing, norms, latent, scale=4, tile=16, overlap=8, pad=16, device=CPU,
                              dtype=torch.float32, one_pass=True, hooks=RunHooks(oom_errors=(FakeOOM,)))
    (retry,) = [r for r in result.retries if r["stage"] == "vae_one_pass"]
    assert retry["fallback"] == "statistics pass" and "injected" in retry["allocator"]
    assert result.statistics["one_pass"] is False and result.statistics["exact"]  # whole-latent statistics pass
    assert (result.image - whole).abs().mean().item() < 0.01
    assert not left_behind(vae)


def test_an_error_in_one_window_stops_every_window_without_hanging(vae, latent):
    run, norms = run_of(vae), norms_of(vae)
    plan = plan_tiles(48, 64, 16, 8, context=16)
    seen = []

    def broken(w):
        seen.append(1)
        if len(seen) == 2:
            raise ValueError("window 2 is broken")
        return run(w)

    start = time.perf_counter()
    with pytest.raises(ValueError, match="window 2 is broken"), torch.inference_mode():
        decode_exact(broken, norms, latent, plan, 4, device=CPU, dtype=torch.float32,
                     attention=vae.decoder.mid_block.attentions[0])
    assert time.perf_counter() - start < 60 and not left_behind(vae)
    assert not [t for t in threading.enumerate() if t.name.startswith("vae-window")]


def test_an_interrupt_stops_the_one_pass_decode(vae, latent):
    run, norms = run_of(vae), norms_of(vae)
    plan = plan_tiles(48, 64, 16, 8, context=16)
    checks = []

    class Interrupted(Exception):
        pass

    def check():
        checks.append(1)
        if len(checks) > 10:
            raise Interrupted("interrupted by the user")

    with pytest.raises(Interrupted), torch.inference_mode():
        decode_exact(run, norms, latent, plan, 4, device=CPU, dtype=torch.float32, check_interrupt=check)
    assert 11 <= len(checks) <= 10 + plan.count and not left_behind(vae)  # stopped at the next check


def test_whole_attention_only_where_it_costs_little():
    small = plan_tiles(40, 40, 16, 8, context=16)
    large = plan_tiles(1024, 1024, 224, 8, context=16)
    per_px = 1.5e8  # the real-size SD x4 decoder's order of magnitude
    assert whole_attention_pays(small, per_px, 512)
    assert not whole_attention_pays(large, per_px, 512)  # a million tokens: quadratic, far past the decode


def test_the_sdx4_decode_chooses_one_pass_from_the_budget(vae):
    from dreamforge_upscale.upscalers.sdx4.sampler import SDX4Options, decode, vae_bytes_per_pixel
    from dreamforge_upscale.upscalers.sdx4.components import SDX4Components

    comps = SDX4Components(None, vae, None, None)
    torch.manual_seed(1)
    z = torch.randn(1, 4, 40, 56) * vae.config.scaling_factor
    per_px = vae_bytes_per_pixel(comps, torch.float32)
    reports = {}
    for name, free in (("roomy", 100 * per_px * 40 * 56), ("short", 0.6 * per_px * 40 * 56)):
        with torch.inference_mode():
            _, report = decode(comps, z, SDX4Options(vae_tile=16), CPU, torch.float32,
                               RunHooks(free_bytes=lambda d, f=free: int(f)))
        reports[name] = report["vae_tiles"]["statistics"]
    assert reports["roomy"]["one_pass"] and reports["roomy"]["exact"]
    assert reports["short"]["one_pass"] is False
