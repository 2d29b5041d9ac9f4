"""Fault injection (CPU): out-of-memory on the k-th model call, always, or above a window size, for small,
strip, large and batched images, GAN-like and tiny SD x4 upscalers, each SD x4 stage (UNet, decode
statistics, decode tiles), with and without fallbacks and strict_scale.

Every run must end within a bounded number of model calls, either with a result whose receipt names each
retry and fallback, or with a clear error; finished work is never thrown away and the input is untouched.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tiny_sdx4
from dreamforge_upscale.tiling import RunHooks, TileOOMError, run_tiled
from dreamforge_upscale.upscalers import UpscaleRequest, UpscalerError, upscale
from dreamforge_upscale.upscalers.contract import Capabilities, Conditioning, ModelSource, WindowResult
from dreamforge_upscale.upscalers.sdx4 import SDX4Options, SDX4Upscaler, sampler
from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer

MAX_CALLS = 400  # far above any legitimate retry sequence here; an endless retry loop passes it quickly
PLENTY = RunHooks(free_bytes=lambda device: 64 * 2**30)  # auto tiles: untiled, so the first call is the whole image


class Fault:
    """When to raise out-of-memory: on call `at` (1-based, once), on every call, or above `pixels` per window."""

    def __init__(self, at: int | None = None, always: bool = False, pixels: int | None = None):
        self.at, self.always, self.pixels, self.calls = at, always, pixels, 0

    def check(self, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise AssertionError(f"more than {MAX_CALLS} model calls: the retry does not end")
        big = self.pixels is not None and x.shape[-2] * x.shape[-1] > self.pixels
        if self.always or self.calls == self.at or big:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.50 GiB (call {self.calls})")


class FaultyGAN:
    """A x2 nearest-neighbour 'GAN' with 4 px of context whose calls fail as the Fault says."""

    offload = False

    def __init__(self, fault: Fault, impl: str = "gan"):
        self.fault = fault
        self.capabilities = Capabilities(impl=impl, native_scales=(2,), dtypes=("fp32",), size_multiple=1, min_size=1,
                                         square=False, context=4, bytes_per_pixel=64.0,
                                         in_channels=3, out_channels=3)
        self.source = ModelSource(f"faulty-{impl}", None, "test")
        self.dtype = torch.float32
        self._module = torch.nn.Linear(1, 1)

    scale = property(lambda self: 2)

    def module(self):
        return self._module

    def forward(self, x):
        """The plain tensor call (what the tiled runner is given)."""
        self.fault.check(x)
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def upscale_window(self, x, cond: Conditioning, hooks=None) -> WindowResult:
        return WindowResult(self.forward(x))

    def describe(self):
        return {**self.source.describe(), "impl": self.capabilities.impl, "native_scale": 2, "dtype": "fp32"}


IMAGES = {"small": (1, 40, 40), "strip": (1, 24, 400), "large": (1, 300, 260), "batch": (3, 64, 48)}


def _image(kind: str) -> torch.Tensor:
    b, h, w = IMAGES[kind]
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(h * w))


def _nearest(image: torch.Tensor, scale: int = 2) -> torch.Tensor:
    return F.interpolate(image.permute(0, 3, 1, 2), scale_factor=scale, mode="nearest").permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------- the tiled runner
@pytest.mark.parametrize("kind", ["small", "strip", "large"])
def test_always_out_of_memory_ends_with_a_clear_error(kind):
    fault = Fault(always=True)
    image = _image(kind)
    with pytest.raises(TileOOMError) as err:
        run_tiled(image, FaultyGAN(fault).forward, 2, tile=0, overlap=8, context=4,
                  device=torch.device("cpu"), dtype=torch.float32, floor=16)
    assert fault.calls <= 16, fault.calls  # halvings only while the windows shrink
    assert "Tried to allocate 1.50 GiB" in str(err.value) and "tried " in str(err.value)
    assert err.value.tried == tuple(sorted(err.value.tried, reverse=True)) and len(set(err.value.tried)) == len(err.value.tried)


def test_whole_axis_tiles_are_not_retried_forever():
    """A 1x200x200 image whose tile grows back to the whole axis (context 64): ends, never loops."""
    fault = Fault(always=True)
    with pytest.raises(TileOOMError):
        run_tiled(torch.rand(1, 200, 200, 3), lambda x: fault.check(x), 4, tile=0, overlap=16, context=64,
                  device=torch.device("cpu"), dtype=torch.float32, floor=64)
    assert fault.calls <= 3, fault.calls


# ------------------------------------------------------------------------------------- GAN requests
@pytest.mark.parametrize("kind", list(IMAGES))
@pytest.mark.parametrize("at", [1, 2, 3, 5, 8])
def test_one_transient_out_of_memory_is_retried_and_recorded(kind, at):
    """Tiles shrink while they can (floor 64 px); at the floor a batch is split; a single image at the
    floor ends with the error, after one call."""
    fault = Fault(at=at)
    image = _image(kind)
    before = image.clone()
    run = lambda: upscale(FaultyGAN(fault), image,
                          UpscaleRequest(scale=2, tile=0 if at == 1 else 128, overlap=4), hooks=PLENTY)  # noqa: E731
    if kind == "small" and at == 1:  # 40 px: already below the floor, nothing smaller to try
        with pytest.raises(TileOOMError, match=r"tried 40; allocator: CUDA out of memory. Tried to allocate 1.50 GiB"):
            run()
        assert fault.calls == 1
        return
    out, receipt = run()
    receipt = receipt.to_dict()
    assert torch.allclose(out, _nearest(image), atol=1e-6)  # nothing half-blended survives a retry
    assert torch.equal(image, before)
    if fault.calls < at:
        assert receipt["retries"] == []  # the fault never fired (fewer tiles than `at`)
        return
    (retry,) = receipt["retries"]
    if kind == "batch":  # 64 px: at the floor, so the batch runs image by image
        assert retry["event"] == "split_batch" and retry["batch"] == 3 and "1.50 GiB" in retry["reason"]
    else:
        assert retry["event"] == "out_of_memory" and retry["retry_tile"] < retry["tile"]
        assert "1.50 GiB" in retry["allocator"] and retry["stage"] == "tiles"


@pytest.mark.parametrize("kind", ["small", "strip", "large"])
def test_out_of_memory_above_a_window_size_shrinks_until_it_fits(kind):
    fault = Fault(pixels=80 * 80)
    image = _image(kind)
    out, receipt = upscale(FaultyGAN(fault), image, UpscaleRequest(scale=2, overlap=4), hooks=PLENTY)
    receipt = receipt.to_dict()
    assert torch.allclose(out, _nearest(image), atol=1e-6)
    if image.shape[1] * image.shape[2] > 80 * 80:
        assert receipt["retries"] and all(r["stage"] == "tiles" for r in receipt["retries"])
        assert receipt["passes"][0]["tiles"]["count"] > 1


def test_a_gan_at_the_floor_raises_instead_of_returning_a_silent_resize():
    fault = Fault(always=True)
    with pytest.raises(TileOOMError, match="out of memory in tiles"):
        upscale(FaultyGAN(fault), _image("small"), UpscaleRequest(scale=2), hooks=PLENTY)
    # only where the caller allows it: a resize, said loudly (receipt + flag)
    out, receipt = upscale(FaultyGAN(Fault(always=True)), _image("small"),
                           UpscaleRequest(scale=2, fallbacks=("resize",)), hooks=PLENTY)
    receipt = receipt.to_dict()
    assert out.shape == (1, 80, 80, 3) and receipt["impl"] == "resample"
    assert receipt["degraded"] == {"ran": "resample", "instead_of": "gan", "reason": receipt["degraded"]["reason"]}
    assert "out of memory" in receipt["degraded"]["reason"]
    assert [f["impl"] for f in receipt["fallbacks"]] == ["gan", "resample"] and receipt["passes"] == []


def test_a_batch_is_split_before_giving_up():
    """OOM whenever more than one image is in a call: the batch runs image by image, recorded."""
    class PerImage(Fault):
        def check(self, x):
            self.calls += 1
            if x.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    fault = PerImage()
    image = _image("batch")
    out, receipt = upscale(FaultyGAN(fault), image, UpscaleRequest(scale=2), hooks=PLENTY)
    receipt = receipt.to_dict()
    assert torch.allclose(out, _nearest(image), atol=1e-6) and fault.calls < 40
    assert receipt["retries"][0]["event"] == "split_batch" and receipt["retries"][0]["batch"] == 3
    assert receipt["fallbacks"] == [] and receipt["degraded"] is None and receipt["batch"] == 3
    assert [p["image"] for p in receipt["passes"]] == [0, 1, 2]  # every image's tiles stay in the receipt


@pytest.mark.parametrize("strict", [False, True])
def test_fallback_chain_with_and_without_strict_scale(strict):
    """A 'diffusion' upscaler that always runs out of memory: a GAN fallback, never under strict_scale."""
    first = FaultyGAN(Fault(always=True), impl="diffusion")
    gan = FaultyGAN(Fault())
    image = _image("small")
    if strict:
        with pytest.raises(UpscalerError, match="strict_scale forbids falling back"):
            upscale(first, image,
                    UpscaleRequest(scale=2, strict_scale=True, fallbacks=("gan", "resize")), hooks=PLENTY,
                    gan=lambda: gan)
        assert gan.fault.calls == 0
        return
    out, receipt = upscale(first, image, UpscaleRequest(scale=2, fallbacks=("gan",)), hooks=PLENTY, gan=lambda: gan)
    receipt = receipt.to_dict()
    assert torch.allclose(out, _nearest(image), atol=1e-6)
    assert [f["impl"] for f in receipt["fallbacks"]] == ["diffusion", "gan"]
    assert receipt["degraded"]["ran"] == "gan" and receipt["degraded"]["instead_of"] == "diffusion"


def test_the_library_and_cli_fallback_is_a_gan_after_a_diffusion_model_only():
    """api.upscale_image's `fallback` (what the command line passes for every model): taken when a diffusion
    model runs out of memory at the floor, never after a GAN, and never a resize (no model)."""
    from dreamforge_upscale.api import upscale_image

    image = _image("small")
    gan = FaultyGAN(Fault())
    result = upscale_image(FaultyGAN(Fault(always=True), impl="diffusion"), image, 2, device="cpu",
                           fallback=lambda: gan)
    receipt = result.receipt.to_dict()
    assert torch.allclose(result.image, _nearest(image), atol=1e-6) and gan.fault.calls > 0
    assert [f["impl"] for f in receipt["fallbacks"]] == ["diffusion", "gan"] and receipt["degraded"]["ran"] == "gan"
    unused = FaultyGAN(Fault())
    with pytest.raises(TileOOMError, match="out of memory in tiles"):
        upscale_image(FaultyGAN(Fault(always=True)), image, 2, device="cpu", fallback=lambda: unused)
    assert unused.fault.calls == 0


# ------------------------------------------------------------------------------------- memory guards
def test_an_output_larger_than_free_memory_is_refused_before_any_work():
    fault = Fault()
    small_ram = RunHooks(free_bytes=lambda device: 50 * 2**20)  # 50 MB free
    with pytest.raises(UpscalerError, match=r"pass 1 of 1 \(x2\) needs a 5200x6000 canvas .* GB of memory are free"):
        upscale(FaultyGAN(fault), torch.rand(1, 3000, 2600, 3), UpscaleRequest(scale=2), hooks=small_ram)
    assert fault.calls == 0


def test_a_canvas_filling_the_cpu_budget_runs_small_tiles_instead_of_crashing():
    """Canvas (7.3 MB) between the tiling budget and the free memory: no TypeError, small tiles, done."""
    fault = Fault()
    hooks = RunHooks(free_bytes=lambda device: 10 * 2**20)
    image = torch.rand(1, 400, 400, 3)  # 800x800x3 float32 output = 7.3 MB
    out, receipt = upscale(FaultyGAN(fault), image, UpscaleRequest(scale=2, overlap=4), hooks=hooks)
    assert out.shape == (1, 800, 800, 3) and receipt.to_dict()["passes"][0]["tiles"]["count"] > 1


def test_max_side_is_checked_for_every_pass(monkeypatch):
    monkeypatch.setenv("DREAMFORGE_MAX_SIDE", "1000")
    fault = Fault()
    with pytest.raises(UpscalerError, match=r"pass 2 of 2 \(x4\) would be 1200x1200, over the largest side allowed"):
        upscale(FaultyGAN(fault), torch.rand(1, 300, 300, 3), UpscaleRequest(scale=3.5), hooks=PLENTY)
    assert fault.calls == 0


# ------------------------------------------------------------------------------------- SD x4 stages
def _sdx4(seed=0) -> SDX4Upscaler:
    unet, vae, text = tiny_sdx4.build_components(seed)
    comps = SDX4Components(unet, vae, text, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir()))
    return SDX4Upscaler(comps, ModelSource("tiny-sdx4", None, "SD x4 upscaler (test)"))


@pytest.fixture(scope="module")
def sdx4_reference():
    """A 64 px input: the UNet untiled (so an out-of-memory retry can halve it to 32), the decode in 2x2
    windows (vae_tile 32 with overlap 8 gives 3x3; padding 4 instead of 16 keeps the tiny decode cheap) with a statistics pass."""
    patch = pytest.MonkeyPatch()
    patch.setattr(sampler, "VAE_PAD", 4)
    # the statistics pass and its retries under test (the layered one pass: tests/test_exact_decode.py)
    patch.setattr(sampler, "plan_exact", lambda *a, **k: (None, "the statistics pass under test"))
    image = _image("large")[:, :64, :64]
    opts = SDX4Options(steps=2, tile=0, overlap=8, vae_tile=32)
    out, receipt = upscale(_sdx4(), image, UpscaleRequest(scale=4, options=opts, seed=3), hooks=PLENTY)
    (only,) = receipt.to_dict()["passes"]
    assert only["tiles"] is None  # SD x4 plans its own tiles: they are in its report
    assert only["backend"]["unet_tiles"]["count"] == 1 and only["backend"]["vae_tiles"]["count"] == 9
    assert only["backend"]["vae_tiles"]["statistics"] == {"side": 64, "exact": True, "one_pass": False,
                                                          "attention": "windowed", "parked": None,
                                                          "refused": "the statistics pass under test"}
    yield image, opts, out
    patch.undo()


def _inject(module: torch.nn.Module, fault: Fault, method: str = "forward"):
    inner = getattr(module, method)

    def faulty(x, *a, **k):
        fault.check(x)
        return inner(x, *a, **k)

    setattr(module, method, faulty)


@pytest.mark.parametrize("stage, at", [("unet", 1), ("unet", 2), ("vae_stats", 1), ("vae_decode", 2), ("vae_decode", 4)])
def test_sdx4_one_out_of_memory_in_any_stage_is_retried_and_keeps_the_denoising(sdx4_reference, stage, at):
    image, opts, _ = sdx4_reference
    up = _sdx4()
    fault = Fault(at=at)
    _inject(up.comps.unet if stage == "unet" else up.comps.vae, fault, "forward" if stage == "unet" else "decode")
    unet_calls = Fault()
    if stage != "unet":
        _inject(up.comps.unet, unet_calls)
    out, receipt = upscale(up, image, UpscaleRequest(scale=4, options=opts, seed=3), hooks=PLENTY)
    receipt = receipt.to_dict()
    backend = receipt["passes"][0]["backend"]
    assert out.shape == (1, 256, 256, 3) and torch.isfinite(out).all()
    stages = [r["stage"] for r in receipt["retries"]]
    assert stages == [stage], receipt["retries"]
    assert receipt["fallbacks"] == [] and receipt["degraded"] is None and receipt["seed"] == 3
    if stage != "unet":  # the denoising ran once: a decode retry never repeats it
        assert unet_calls.calls == opts.steps
    else:  # only the failed step is repeated, then it and the rest run in tiles of 32
        tiles = backend["unet_tiles"]["count"]
        assert tiles > 1 and fault.calls == (at - 1) + 1 + tiles * (opts.steps - at + 1)
    if stage == "vae_stats":
        assert backend["vae_tiles"]["statistics"]["exact"] is False  # said, not hidden


@pytest.mark.parametrize("stage", ["unet", "vae_decode"])
@pytest.mark.parametrize("strict", [False, True])
def test_sdx4_always_out_of_memory_falls_back_or_raises_within_bounds(sdx4_reference, stage, strict):
    image, opts, _ = sdx4_reference
    up = _sdx4()
    fault = Fault(always=True)
    _inject(up.comps.unet if stage == "unet" else up.comps.vae, fault, "forward" if stage == "unet" else "decode")
    gan = FaultyGAN(Fault())
    if strict:
        with pytest.raises(UpscalerError, match="strict_scale forbids"):
            upscale(up, image,
                    UpscaleRequest(scale=4, options=opts, strict_scale=True, fallbacks=("gan",)), hooks=PLENTY,
                    gan=lambda: gan)
    else:
        out, receipt = upscale(up, image,
                               UpscaleRequest(scale=4, options=opts, fallbacks=("gan",)), hooks=PLENTY,
                               gan=lambda: gan)
        receipt = receipt.to_dict()
        assert out.shape == (1, 256, 256, 3) and receipt["impl"] == "gan"
        assert receipt["fallbacks"][0]["impl"] == "diffusion" and receipt["degraded"]["instead_of"] == "diffusion"
    assert fault.calls <= 12, fault.calls  # unet: 64, 32 then the floor; decode: 32, 16 (+ statistics)


def test_sdx4_exact_statistics_when_memory_allows_and_the_tone_difference(sdx4_reference):
    """Exact statistics (the whole latent) vs a downsampled pass, against the untiled decode."""
    image, opts, exact = sdx4_reference
    untiled, _ = upscale(_sdx4(), image,
                         UpscaleRequest(scale=4, options=dataclasses.replace(opts, vae_tile=0), seed=3), hooks=PLENTY)
    # a budget that lets the statistics pass decode only a ~27 px latent: approximate, and said so
    tight = RunHooks(free_bytes=lambda device: 40 * 2**20)
    approx, receipt = upscale(_sdx4(), image,
                              UpscaleRequest(scale=4, options=dataclasses.replace(opts, tile=64), seed=3),
                              hooks=tight)
    assert receipt.to_dict()["passes"][0]["backend"]["vae_tiles"]["statistics"]["exact"] is False
    err_exact = (exact - untiled).abs().mean().item()
    err_approx = (approx - untiled).abs().mean().item()
    print(f"mean |tiled - untiled| decode: exact statistics {err_exact:.5f}, downsampled {err_approx:.5f}")
    assert err_exact < err_approx


def test_sdx4_offload_moves_one_network_at_a_time_to_the_hosts_offload_device():
    """Spy on device moves: the holder is never moved whole; parked networks go to the host's device."""
    up = _sdx4()
    up.offload = True
    moves = []
    parked = torch.device("cpu", 0)  # a device name distinct from the compute device "cpu"
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(up.comps, name)
        original = module.to

        def spy(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0] if args else kwargs.get("device"))))
            return _original(*args, **kwargs)

        module.to = spy
    holder_to = up.holder.to
    up.holder.to = lambda *a, **k: (moves.append(("holder", str(a[0] if a else k))), holder_to(*a, **k))[1]
    out, _ = upscale(up, _image("small")[:, :16, :16],
                     UpscaleRequest(scale=4, options=SDX4Options(steps=1)), device=torch.device("cpu"),
                     hooks=RunHooks(offload_device=parked, free_bytes=lambda d: 64 * 2**30))
    assert out.shape == (1, 64, 64, 3)
    assert all(name != "holder" for name, _ in moves), moves
    on_device = [name for name, device in moves if device == "cpu"]
    assert on_device == ["text_encoder", "unet", "vae"], moves  # each network in turn
    for name in on_device:  # before each network comes in, the two others were parked
        i = moves.index((name, "cpu"))
        assert {n for n, d in moves[i - 2 : i]} == {"unet", "vae", "text_encoder"} - {name}
        assert all(d == "cpu:0" for _, d in moves[i - 2 : i]), moves
