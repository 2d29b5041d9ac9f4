"""The exact tiled VAE decode: the decoder layer by layer over its windows, GroupNorm sums shared across them,
whole activations parked between GroupNorms (device, host RAM or files), each window reading its halo from
them, the middle attention over the whole latent; equal to the untiled decode, planned from the budget, and
every failure path bounded."""
from __future__ import annotations

import os
import tempfile

import pytest
import tiny_sdx4
import torch
from dreamforge_upscale.tiling import RunHooks, exact_decode, parking
from dreamforge_upscale.tiling.decoder_program import ATTENTION, NORM, NotAProgram, probe
from dreamforge_upscale.tiling.exact_decode import decode_exact, owned, plan_exact, whole_attention_pays
from dreamforge_upscale.tiling.parking import Canvas, ParkedStore
from dreamforge_upscale.tiling.plan import plan_tiles
from dreamforge_upscale.tiling.vae_tiles import decode_tiled
from dreamforge_upscale.upscalers.vae_program import vae_decoder_program

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(scope="module")
def vae():
    _, vae, _ = tiny_sdx4.build_components(0)
    return vae.eval()


@pytest.fixture(scope="module")
def latent():
    torch.manual_seed(0)
    return torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16), size=(48, 64), mode="bicubic") * 3 + 1


def finish(decoded):
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def run_of(vae):
    def run(w):
        return finish(vae.decode(w, return_dict=False)[0])
    return run


def norms_of(vae):
    return [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]


def left_behind(vae) -> list:
    return [m for m in vae.decoder.modules() if "forward" in m.__dict__]


def stores_left(folder) -> list:
    return os.listdir(folder)  # the store's files are unlinked from the start: nothing ever shows


def planned(vae, latent, budget=1e12, **kw):
    exact, why = plan_exact(lambda: vae_decoder_program(vae, finish), run_of(vae), latent, 16, 16, 1000.0, budget,
                            CPU, F32, **kw)
    assert exact is not None, why
    return exact


def tiled(vae, latent, **kw):
    return decode_tiled(run_of(vae), norms_of(vae), latent, scale=4, tile=16, overlap=8, pad=16, device=CPU,
                        dtype=F32, **kw)


def test_owned_regions_partition_each_axis():
    for length, tile, overlap in ((64, 16, 8), (301, 100, 8), (48, 48, 0)):
        plan = plan_tiles(length, length, tile, overlap, context=16)
        parts = owned(plan.rows)
        assert parts[0][0] == 0 and parts[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        for i, (a, b) in enumerate(parts):  # inside the tile's own core, at least overlap/2 from its window edge
            start, end = plan.rows.starts[i], plan.rows.starts[i] + plan.rows.tile
            assert start <= a < b <= end


def test_the_program_reproduces_the_decoder_and_measures_each_segments_halo(vae):
    program = vae_decoder_program(vae, finish)
    probed = probe(program, run_of(vae), 4, CPU, F32)
    syncs = [s for s in program if s.kind in (NORM, ATTENTION)]
    assert len(probed.halos) == len(syncs) + 1
    # one 3x3 convolution between most GroupNorms; two where an upsampler's convolution follows a block's last one
    # (its half pixel at the input's resolution rounds up), none from the attention to the next block's GroupNorm
    assert probed.halos.count(2) == 2 and probed.halos.count(0) == 1 and set(probed.halos) == {0, 1, 2}
    # the fullest segment (float32, 16 px per latent px): the last up block's first residual block (64 -> 32
    # channels) from its second GroupNorm to the next block's first, reading its input and its 64-channel residual,
    # writing the next block's input
    assert probed.parked_per_px == 4 * 16 * (32 + 64 + 32)


def test_the_halos_are_what_makes_it_exact(vae, latent):
    exact = planned(vae, latent)
    with torch.inference_mode(), ParkedStore("device", CPU) as store:
        whole = run_of(vae)(latent).permute(0, 2, 3, 1)
        one = decode_exact(exact.program, exact.halos, latent, exact.plan(48, 64), 4, device=CPU, dtype=F32,
                           store=store, whole_attention=True)
        assert store.bytes == 0 and store.peak_bytes == exact.parked_bytes  # the plan's figure is what parks
        blind = decode_exact(exact.program, (0,) * len(exact.halos), latent, exact.plan(48, 64), 4, device=CPU,
                             dtype=F32, store=store, whole_attention=True)
    assert (one - whole).abs().max().item() <= 1e-4
    assert (blind - whole).abs().max().item() > 1e-2  # windows that read no halo: seams where they meet


def test_a_decoder_the_program_does_not_know_is_refused(vae, latent):
    original = type(vae.decoder).forward
    vae.decoder.forward = lambda z, *a: original(vae.decoder, z, *a) * 0.5  # e.g. a later diffusers' decoder
    try:
        exact, why = plan_exact(lambda: vae_decoder_program(vae, finish), run_of(vae), latent, 16, 16, 1000.0,
                                1e12, CPU, F32)
    finally:
        del vae.decoder.forward
    assert exact is None and "cannot run layer by layer" in why and "does not reproduce" in why
    vae.decoder.mid_block.resnets[0].time_emb_proj = torch.nn.Linear(1, 1)
    try:
        with pytest.raises(NotAProgram, match="time embedding"):
            vae_decoder_program(vae, finish)
    finally:
        vae.decoder.mid_block.resnets[0].time_emb_proj = None


@pytest.mark.parametrize("parked", ["device", "disk"])
def test_one_pass_equals_the_untiled_decode(vae, latent, parked, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exact = planned(vae, latent)
    assert exact.whole_attention and max(exact.halos) <= 2  # a pixel or two of context per layer, not 16
    with torch.inference_mode():
        whole = run_of(vae)(latent).permute(0, 2, 3, 1)
        one = tiled(vae, latent, exact=exact.__class__(**{**exact.__dict__, "parked": parked}))
        windowed = tiled(vae, latent, exact=exact.__class__(**{**exact.__dict__, "parked": parked,
                                                               "whole_attention": False}))
        stats_pass = tiled(vae, latent)
    assert one.plan.count > 1 and one.image.shape == whole.shape
    assert (one.image - whole).abs().max().item() <= 1e-4  # both exact parts on: the untiled decode
    assert one.statistics.pop("parked_bytes") == exact.parked_bytes > 0
    assert one.statistics == {"side": 64, "exact": True, "one_pass": True, "attention": "whole", "parked": parked}
    assert windowed.statistics["attention"] == "windowed" and windowed.statistics["one_pass"]
    # windowed attention is the only approximation left: no worse than the statistics pass, which also windows it
    err_windowed = (windowed.image - whole).abs().mean().item()
    assert 0 < err_windowed <= (stats_pass.image - whole).abs().mean().item() + 1e-6
    assert stats_pass.statistics["one_pass"] is False and stats_pass.statistics["parked"] is None
    assert not left_behind(vae) and not stores_left(tmp_path)


@pytest.mark.parametrize("where", ["device", "cpu", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_canvas_gives_back_any_box_of_what_its_windows_wrote(where, dtype, tmp_path):
    x = torch.randn(2, 3, 9, 11).to(dtype)
    with ParkedStore(where, CPU, folder=str(tmp_path)) as store:
        canvas = store.canvas(tuple(x.shape), dtype)
        for ys, xs in ((slice(0, 4), slice(0, 6)), (slice(0, 4), slice(6, 11)), (slice(4, 9), slice(0, 11))):
            canvas.write(ys, xs, x[..., ys, xs].contiguous(memory_format=torch.channels_last))
        assert not stores_left(tmp_path)  # on disk, yet no name: a killed process leaves nothing behind
        assert store.bytes == x.numel() * x.element_size()
        box = canvas.read(slice(2, 7), slice(3, 10))  # across all three windows
        assert box.dtype == dtype and torch.equal(box, x[..., 2:7, 3:10]) and torch.equal(canvas.whole(), x)
        held = store.canvas_of(x * 2)
        assert torch.equal(held.read(slice(8, 9), slice(0, 1)), x[..., 8:9, 0:1] * 2)
        canvas.close()
        assert store.bytes == held.nbytes
    assert store.bytes == 0 and not stores_left(tmp_path)


class FakeOOM(RuntimeError):
    pass


def _fail_on(module: torch.nn.Module, call: int, error: BaseException):
    calls = []
    original = type(module).forward.__get__(module)

    def forward(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*a, **kw)
    module.forward = forward


def test_out_of_memory_in_one_pass_falls_back_to_the_statistics_pass(vae, latent):
    exact = planned(vae, latent)
    with torch.inference_mode():
        whole = run_of(vae)(latent).permute(0, 2, 3, 1)
    conv = vae.decoder.up_blocks[1].resnets[0].conv1
    _fail_on(conv, 3, FakeOOM("CUDA out of memory (injected)"))  # the third window
    try:
        with torch.inference_mode():
            result = tiled(vae, latent, exact=exact, hooks=RunHooks(oom_errors=(FakeOOM,)))
    finally:
        del conv.forward
    (retry,) = [r for r in result.retries if r["stage"] == "vae_one_pass"]
    assert retry["fallback"] == "statistics pass" and "injected" in retry["allocator"] and retry["parked"] == "device"
    assert result.statistics["one_pass"] is False and result.statistics["exact"]  # whole-latent statistics pass
    assert "out_of_memory" in result.statistics["refused"]
    assert (result.image - whole).abs().mean().item() < 0.01
    assert not left_behind(vae)


def test_a_disk_that_fills_up_falls_back_and_leaves_no_files(vae, latent, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    writes = []
    exact = planned(vae, latent, budget=1e3)  # nothing fits the budget: files
    assert exact.parked == "disk"
    monkeypatch.setattr(parking.Canvas, "write", _failing_write(writes))
    with torch.inference_mode():
        result = tiled(vae, latent, exact=exact)
    (retry,) = [r for r in result.retries if r["stage"] == "vae_one_pass"]
    assert retry["event"] == "parking_failed" and "No space left" in retry["error"] and retry["parked"] == "disk"
    assert result.statistics["one_pass"] is False and result.image.shape[1:3] == (192, 256)
    assert not stores_left(tmp_path) and not left_behind(vae)


def _failing_write(writes):
    real = Canvas.write

    def write(self, ys, xs, part):
        writes.append(ys)
        if len(writes) == 5:
            raise OSError(28, "No space left on device")
        return real(self, ys, xs, part)
    return write


def test_an_error_in_one_window_is_raised_and_leaves_nothing_behind(vae, latent, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exact = planned(vae, latent, budget=1e3)
    conv = vae.decoder.conv_out
    _fail_on(conv, 2, ValueError("window 2 is broken"))
    try:
        with pytest.raises(ValueError, match="window 2 is broken"), torch.inference_mode():
            tiled(vae, latent, exact=exact)
    finally:
        del conv.forward
    assert not left_behind(vae) and not stores_left(tmp_path)


def test_an_interrupt_stops_the_one_pass_decode(vae, latent):
    exact = planned(vae, latent)
    plan = exact.plan(48, 64)
    checks = []

    class Interrupted(Exception):
        pass

    def check():
        checks.append(1)
        if len(checks) > 10:
            raise Interrupted("interrupted by the user")

    with pytest.raises(Interrupted), torch.inference_mode(), ParkedStore("device", CPU) as store:
        decode_exact(exact.program, exact.halos, latent, plan, 4, device=CPU, dtype=F32, store=store,
                     check_interrupt=check)
    assert len(checks) == 11 and not left_behind(vae)  # stopped at the next window


def test_whole_attention_only_where_it_costs_little():
    small = plan_tiles(40, 40, 16, 8, context=16)
    large = plan_tiles(1024, 1024, 224, 8, context=16)
    per_px = 1.5e8  # the real-size SD x4 decoder's order of magnitude
    assert whole_attention_pays(small, per_px, 512)
    assert not whole_attention_pays(large, per_px, 512)  # a million tokens: quadratic, far past the decode


def test_the_sdx4_decode_plans_the_one_pass_from_the_budget(vae, tmp_path, monkeypatch):
    from dreamforge_upscale.upscalers.sdx4.components import SDX4Components
    from dreamforge_upscale.upscalers.sdx4.sampler import SDX4Options, decode, vae_bytes_per_pixel

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    comps = SDX4Components(None, vae, None, None)
    torch.manual_seed(1)
    z = torch.randn(1, 4, 40, 56) * vae.config.scaling_factor
    per_px = vae_bytes_per_pixel(comps, F32)
    reports = {}
    for name, free, disk in (("roomy", 100 * per_px * 40 * 56, None), ("short", 0.6 * per_px * 40 * 56, None),
                             ("no disk", 0.6 * per_px * 40 * 56, 0)):
        if disk is not None:
            monkeypatch.setattr(exact_decode, "disk_free", lambda folder=None: disk)
        with torch.inference_mode():
            _, report = decode(comps, z, SDX4Options(vae_tile=16), CPU, F32,
                               RunHooks(free_bytes=lambda d, f=free: int(f)))
        reports[name] = report["vae_tiles"]["statistics"]
    assert reports["roomy"].pop("parked_bytes") > 0
    assert reports["roomy"] == {"side": 56, "exact": True, "one_pass": True, "attention": "whole", "parked": "device"}
    assert reports["short"]["one_pass"] and reports["short"]["exact"] and reports["short"]["parked"] == "disk"
    assert reports["no disk"]["one_pass"] is False and "temporary disk" in reports["no disk"]["refused"]
    assert not stores_left(tmp_path)
