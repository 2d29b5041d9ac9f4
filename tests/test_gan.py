"""The GAN backend on real Real-ESRGAN weights (../shared/weights) and real photos (scikit-image)."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from skimage import data

from dreamforge_upscale.tiling import plan_tiles, resize
from dreamforge_upscale.upscalers import GANUpscaler, UpscaleRequest, UpscalerError, plan_scale, resolve_load_impl, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.runtime.dtypes import select_dtype

WEIGHTS = Path(os.environ.get("DF_SHARED_WEIGHTS", Path(__file__).resolve().parents[2] / "shared" / "weights"))
X4PLUS = WEIGHTS / "RealESRGAN_x4plus.pth"
needs_x4plus = pytest.mark.skipif(not X4PLUS.is_file(), reason=f"real RealESRGAN_x4plus weights not found at {X4PLUS}")


def photo(name="astronaut", top=0, left=0, h=96, w=128):
    img = getattr(data, name)()[top : top + h, left : left + w]
    return torch.from_numpy(img.copy()).float().div(255)[None]


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path())


def tiles(receipt, index=0) -> dict:
    """The pack's tile plan of one pass, as the receipt's JSON says it."""
    return receipt.to_dict()["passes"][index]["tiles"]


def seam_excess(tiled, untiled, plan, scale):
    """Mean |tiled - untiled| on the overlap bands minus that in the tile interiors (≈0: no seam)."""
    diff = (tiled - untiled).abs().mean(dim=(0, 3))
    band = torch.zeros_like(diff, dtype=torch.bool)
    for axis, dim in ((plan.cols, 1), (plan.rows, 0)):
        for a, b in zip(axis.starts, axis.starts[1:]):
            lo, hi = b * scale, (a + axis.tile) * scale
            if dim == 1:
                band[:, lo:hi] = True
            else:
                band[lo:hi, :] = True
    return (diff[band].mean() - diff[~band].mean()).item()


def test_bundled_model_is_the_real_compact(compact):
    assert compact.capabilities.native_scales == (4,)
    assert compact.source.architecture == "RealESRGAN Compact"
    assert compact.source.sha256.startswith("9917685390d0")
    assert compact.dtype == torch.float32  # auto on the CPU


def test_compact_tiled_matches_untiled_on_real_photo(compact):
    image = photo("coffee", 100, 150, 120, 200)
    untiled, r0 = upscale(compact, image)
    tiled, r1 = upscale(compact, image, UpscaleRequest(tile=48))
    assert tiles(r0)["count"] == 1 and tiles(r1)["count"] > 4
    assert tiled.shape == untiled.shape == (1, 480, 800, 3)
    assert (tiled - untiled).abs().max() <= 1 / 255
    plan = plan_tiles(120, 200, 48, tiles(r1)["overlap"], compact.capabilities.context)
    assert seam_excess(tiled, untiled, plan, 4) < 0.05 / 255


def test_compact_needs_its_declared_context(compact):
    """Measure: the smallest context that makes a tile's core match untiled within 1/255."""
    image = photo("chelsea", 50, 50, 96, 160)
    untiled, _ = upscale(compact, image)
    errors = {}
    for ctx in (0, 8, 32):
        caps = compact.capabilities
        object.__setattr__(caps, "context", ctx)
        try:
            tiled, _ = upscale(compact, image, UpscaleRequest(tile=32))
        finally:
            object.__setattr__(caps, "context", 32)
        errors[ctx] = (tiled - untiled).abs().max().item() * 255
    assert errors[0] > 2  # without context tiles differ visibly: the measurement can fail
    assert errors[32] <= 1.0
    assert errors[8] > errors[32]


@needs_x4plus
@pytest.mark.slow
def test_x4plus_tiled_within_3_of_255():
    model = GANUpscaler.load(X4PLUS)
    assert model.source.architecture == "ESRGAN" and model.capabilities.context == 64
    image = photo("astronaut", 40, 100, 48, 224)
    untiled, _ = upscale(model, image)
    tiled, receipt = upscale(model, image, UpscaleRequest(tile=64))
    assert tiles(receipt)["count"] >= 3
    assert (tiled - untiled).abs().max() <= 3 / 255


@pytest.mark.parametrize("scale,passes", [(2.5, 1), (1.5, 1), (0.5, 1), (6.0, 2)])
def test_scale_other_than_native_gives_exact_size(compact, scale, passes):
    image = photo("astronaut", 0, 0, 37, 53)
    out, receipt = upscale(compact, image, UpscaleRequest(scale=scale))
    assert out.shape == (1, round(37 * scale), round(53 * scale), 3)
    r = receipt.to_dict()
    assert r["pass_count"] == passes and len(r["passes"]) == passes and r["resampled"]["from_scale"] == 4**passes
    assert out.min() >= 0 and out.max() <= 1


def test_resampled_output_is_the_native_output_resized(compact):
    image = photo("coffee", 0, 0, 40, 60)
    native, _ = upscale(compact, image)
    half, _ = upscale(compact, image, UpscaleRequest(scale=2.0, resample="bicubic"))
    assert torch.allclose(half, resize(native, 80, 120, "bicubic"), atol=1e-6)


def test_strict_scale_refuses_resampling(compact):
    with pytest.raises(UpscalerError, match="strict_scale.*scale 2"):
        upscale(compact, photo(), UpscaleRequest(scale=2.0, strict_scale=True))
    out, receipt = upscale(compact, photo(h=16, w=16), UpscaleRequest(scale=16.0, strict_scale=True))  # 4x4: chained natively
    r = receipt.to_dict()
    assert out.shape == (1, 256, 256, 3) and r["resampled"] is None and r["pass_count"] == 2 == len(r["passes"])


def test_rgba_keeps_alpha(compact):
    rgb = photo(h=32, w=40)
    alpha = torch.linspace(0, 1, 40).expand(1, 32, 40)[..., None]
    out, receipt = upscale(compact, torch.cat([rgb, alpha], dim=-1))
    assert out.shape == (1, 128, 160, 4)
    assert torch.allclose(out[..., 3:], resize(alpha, 128, 160, "bicubic"))
    rgb_only, _ = upscale(compact, rgb)
    assert torch.allclose(out[..., :3], rgb_only)
    assert receipt.to_dict()["alpha"]


def test_batch_equals_one_by_one(compact):
    a, b = photo("astronaut", h=24, w=24), photo("coffee", h=24, w=24)
    both, receipt = upscale(compact, torch.cat([a, b]), UpscaleRequest(tile=16))
    assert receipt.to_dict()["batch"] == 2
    assert torch.allclose(both[0:1], upscale(compact, a, UpscaleRequest(tile=16))[0], atol=1e-5)
    assert torch.allclose(both[1:2], upscale(compact, b, UpscaleRequest(tile=16))[0], atol=1e-5)


def test_receipt_says_what_ran(compact):
    _, receipt = upscale(compact, photo(h=80, w=120), UpscaleRequest(scale=3.0, tile=16, overlap=4))
    r = receipt.to_dict()
    assert r["impl"] == "gan" and r["model"]["file"] == "realesr-animevideov3.pth"
    assert r["model"]["sha256"] == "9917685390d0" and r["model"]["architecture"] == "RealESRGAN Compact"
    assert r["native_scale"] == 4 and r["requested_scale"] == 3.0 and r["output_size"] == [360, 240]
    assert r["dtype"] == "fp32" and r["device"] == "cpu"
    plan = r["passes"][0]["tiles"]
    assert plan["count"] > 1 and plan["overlap"] >= 4 and plan["context"] == 32
    assert r["pass_count"] == 1 and r["passes"][0]["input_size"] == [120, 80]
    assert r["passes"][0]["output_size"] == [480, 320] and r["resampled"]["from_scale"] == 4
    assert r["passes"][0]["prompts"] == [] and r["passes"][0]["backend"] == {}
    assert r["prompt"] is None and r["seed"] is None and r["degraded"] is None  # a GAN takes no prompt
    assert r["retries"] == [] and r["fallbacks"] == [] and r["seconds"] > 0


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 0, 5, 3), "empty"),
    (torch.full((1, 8, 8, 3), float("nan")), "NaN"),
    (torch.zeros(1, 8, 8, 2), "channels"),
    (torch.zeros(8, 8, 3), "IMAGE tensor"),
])
def test_bad_images_are_refused_clearly(compact, bad, match):
    with pytest.raises(UpscalerError, match=match):
        upscale(compact, bad)


def test_auto_tile_follows_free_memory(compact):
    from dreamforge_upscale.tiling import RunHooks

    image = photo(h=160, w=160)
    roomy, r0 = upscale(compact, image)
    tight, r1 = upscale(compact, image, hooks=RunHooks(free_bytes=lambda d: 20_000_000))
    assert tiles(r0)["count"] == 1 and tiles(r1)["count"] > 1
    assert (roomy - tight).abs().max() <= 1 / 255


def _realesrgan_x2plus_state_dict(nf=16, gc=32, blocks=1):
    """Random weights in the upstream RealESRGAN_x2plus key layout (RRDBNet, pixel-unshuffle input)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"conv_first": (nf, 12)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for i in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{i}"] = (nf if i == 5 else gc, nf + (i - 1) * gc)
    shapes.update({k: (nf, nf) for k in ("conv_body", "conv_up1", "conv_up2", "conv_hr")})
    shapes["conv_last"] = (3, nf)
    sd = {}
    for name, (out_c, in_c) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=g) * 0.05
        sd[f"{name}.bias"] = torch.zeros(out_c)
    return sd


def test_x2plus_architecture_with_pixel_unshuffle(tmp_path):
    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": _realesrgan_x2plus_state_dict()}, path)
    model = GANUpscaler.load(path)
    assert model.capabilities.native_scales == (2,) and model.capabilities.size_multiple % 2 == 0
    out, _ = upscale(model, photo(h=21, w=33))  # odd sizes: windows padded to the model's multiple
    assert out.shape == (1, 42, 66, 3)
    image = photo(h=90, w=200)
    tiled, r = upscale(model, image, UpscaleRequest(tile=32))
    untiled, _ = upscale(model, image)
    assert tiles(r)["count"] > 1 and (tiled - untiled).abs().max() <= 1 / 255


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/df-pwned",))


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"params": _Evil()}, fh)
    if os.path.exists("/tmp/df-pwned"):
        os.remove("/tmp/df-pwned")
    with pytest.raises(UpscalerError, match="could not be read as model weights"):
        GANUpscaler.load(path)
    assert not os.path.exists("/tmp/df-pwned")


def test_wrong_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(UpscalerError, match="could not be read as model weights"):
        GANUpscaler.load(junk)
    with pytest.raises(UpscalerError, match="not found"):
        GANUpscaler.load(tmp_path / "missing.pth")
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(UpscalerError, match="unsupported model file type"):
        GANUpscaler.load(txt)
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(10, 5)}, str(other))
    with pytest.raises(UpscalerError, match="not a model architecture spandrel recognises"):
        GANUpscaler.load(other)


def test_sd_x4_checkpoint_is_recognised(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(256, 7, 3, 3, dtype=torch.float16),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3, dtype=torch.float16)}
    single = tmp_path / "x4-upscaler-ema.safetensors"
    save_file(sd, str(single))
    with pytest.raises(UpscalerError, match="Stable Diffusion x4.*impl 'diffusion'"):
        GANUpscaler.load(single)
    pickled = tmp_path / "x4-upscaler-ema.ckpt"
    torch.save({"state_dict": sd}, pickled)
    with pytest.raises(UpscalerError, match="Stable Diffusion x4"):
        GANUpscaler.load(pickled)


def test_impl_policy_for_loading():
    assert resolve_load_impl("auto", False, "a.pth") == "gan" and resolve_load_impl("gan", False, "a.pth") == "gan"
    assert resolve_load_impl("auto", True, "x4") == "diffusion" == resolve_load_impl("diffusion", True, "x4")
    with pytest.raises(UpscalerError, match="impl 'diffusion' needs the Stable Diffusion x4 upscaler, but a.pth is a GAN"):
        resolve_load_impl("diffusion", False, "a.pth")
    with pytest.raises(UpscalerError, match="impl 'gan': x4 is the Stable Diffusion x4 upscaler"):
        resolve_load_impl("gan", True, "x4")
    with pytest.raises(UpscalerError, match="impl must be one of"):
        resolve_load_impl("magic", False, "a.pth")


def test_scale_plan(compact):
    caps = compact.capabilities
    assert plan_scale(caps, None, False, "m").reached == 4
    assert plan_scale(caps, 4.0, True, "m").resample is False
    assert plan_scale(caps, 4.01, False, "m").passes == 2
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UpscalerError, match="scale must be a positive number"):
            plan_scale(caps, bad, False, "m")


def test_dtype_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_dtype("auto", cpu, True, True) == torch.float32
    assert select_dtype("auto", cuda, True, True) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_dtype("auto", cuda, False, True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_dtype("auto", cuda, False, True) == torch.float32
    assert select_dtype("bf16", cpu, True, True) == torch.bfloat16
    assert select_dtype("fp32", cuda, True, True) == torch.float32
    with pytest.raises(UpscalerError, match="fp16 is not supported on the CPU"):
        select_dtype("fp16", cpu, True, True)
    with pytest.raises(UpscalerError, match="wrong results in fp16"):
        select_dtype("fp16", cuda, False, True)
    with pytest.raises(UpscalerError, match="does not support bfloat16"):
        select_dtype("bf16", cpu, True, False)


def test_bf16_runs_close_to_fp32():
    fp32 = GANUpscaler.load(bundled_model_path())
    bf16 = GANUpscaler.load(bundled_model_path(), dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    image = photo(h=24, w=24)
    a, _ = upscale(fp32, image)
    b, receipt = upscale(bf16, image)
    r = receipt.to_dict()
    assert r["dtype"] == "bf16"
    from dreamforge_upscale.runtime.dtypes import cpu_bf16_accelerated

    emulated = [n for n in r["notes"] if "bf16 is emulated" in n]
    assert bool(emulated) == (not cpu_bf16_accelerated())  # says when bf16 is only emulated
    assert (a - b).abs().mean() <= 2 / 255


def test_an_empty_model_file_and_errors_with_empty_messages_are_reported_clearly(tmp_path, monkeypatch):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UpscalerError, match=r"empty.pth is empty \(0 bytes\)"):
        GANUpscaler.load(empty)
    # an unpickler error without a message (EOFError()) must not break the message built from it
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(EOFError()))
    with pytest.raises(UpscalerError, match=r"broken.pth could not be read as model weights \(EOFError\)"):
        GANUpscaler.load(broken)


def test_an_sd_x4_pickle_is_recognised_without_reading_its_tensors(tmp_path):
    """A .ckpt SD x4 in upscale_models is recognised from its index (weights-only, memory-mapped)."""
    from dreamforge_upscale.upscalers.sdx4.detect import is_sdx4_file

    ckpt = tmp_path / "x4-upscaler-ema.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 7, 3, 3)}}, ckpt)
    gan = tmp_path / "4x_other.pth"
    torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, gan)
    assert is_sdx4_file(ckpt) and not is_sdx4_file(gan)


def test_a_model_someone_else_loaded_is_used_as_it_is(monkeypatch):
    """ComfyUI's UPSCALE_MODEL: not deep-copied (the capability trace copies no weights), not changed."""
    import copy

    from spandrel import ModelLoader

    descriptor = ModelLoader().load_from_file(str(bundled_model_path()))
    before = {n: (p.data_ptr(), p.is_contiguous()) for n, p in descriptor.model.named_parameters()}
    copied = []
    real_deepcopy = copy.deepcopy

    def counting(obj, memo=None):
        out = real_deepcopy(obj, memo)
        copied.extend(t for t in (out.parameters() if isinstance(out, torch.nn.Module) else []) if t.device.type != "meta")
        return out

    monkeypatch.setattr(copy, "deepcopy", counting)
    up = GANUpscaler.from_descriptor(descriptor)
    assert copied == []  # shapes only
    assert {n: (p.data_ptr(), p.is_contiguous()) for n, p in descriptor.model.named_parameters()} == before
    assert not hasattr(descriptor, "patcher") and up.capabilities.bytes_per_pixel > 0
