"""ESRGAN-family heads: nearest upsample + 3x3 conv computed on the low-resolution map (upscalers/gan/nearest_upconv.py)."""
import os
from pathlib import Path

import pytest
import torch
from spandrel import ModelLoader
from torch import nn

from dreamforge_upscale.upscalers import GANUpscaler, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.upscalers.gan import nearest_upconv
from dreamforge_upscale.upscalers.gan.nearest_upconv import NearestUpConv, rewrite_checked

WEIGHTS = Path(os.environ.get("DF_SHARED_WEIGHTS", Path(__file__).resolve().parents[2] / "shared" / "weights"))
X4PLUS = WEIGHTS / "RealESRGAN_x4plus.pth"


def _rrdb_x4_state_dict(nf=16, gc=32, blocks=1):
    """Random weights in RealESRGAN_x4plus's key layout (RRDBNet x4: two nearest-upsample + conv stages)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"conv_first": (nf, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for i in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{i}"] = (nf if i == 5 else gc, nf + (i - 1) * gc)
    shapes.update({k: (nf, nf) for k in ("conv_body", "conv_up1", "conv_up2", "conv_hr")})
    shapes["conv_last"] = (3, nf)
    sd = {}
    for name, (out_c, in_c) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=g) * (1.0 / (in_c * 9) ** 0.5)
        sd[f"{name}.bias"] = torch.randn(out_c, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_upsample_then_conv(scale, channels_last, bias):
    torch.manual_seed(scale)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    reference = nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"), conv)
    x = torch.randn(2, 5, 9, 13)  # odd sizes: every phase meets the zero border
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = reference(x), NearestUpConv(conv, scale)(x)
    assert got.shape == expected.shape == (2, 7, 9 * scale, 13 * scale)
    assert (got - expected).abs().max() < 1e-5
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_rrdb_head_rewritten_in_place_same_output():
    model = ModelLoader().load_from_state_dict(_rrdb_x4_state_dict()).model.eval()
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        before = model(x)
        kept = rewrite_checked(model, torch.rand(1, 3, 16, 16))
        after = model(x)
    assert kept == 2  # conv_up1 (2x) and conv_up2 (4x)
    assert sum(isinstance(m, nn.Upsample) for m in model.modules()) == 0
    assert sum(isinstance(m, NearestUpConv) for m in model.modules()) == 2
    assert (after - before).abs().max() < 1e-5


def test_a_rewrite_that_deviates_is_undone(monkeypatch):
    """Fault injection: a rewritten stage that computes something else must leave the model as it was."""
    model = ModelLoader().load_from_state_dict(_rrdb_x4_state_dict()).model.eval()
    modules_before = [type(m) for m in model.modules()]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    real_forward = NearestUpConv.forward
    monkeypatch.setattr(NearestUpConv, "forward", lambda self, t: real_forward(self, t) + 0.01)
    assert rewrite_checked(model, x) == 0
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert [type(m) for m in model.modules()] == modules_before

    monkeypatch.setattr(NearestUpConv, "forward", lambda self, t: 1 / 0)  # a rewrite that fails outright
    assert rewrite_checked(model, x) == 0
    assert [type(m) for m in model.modules()] == modules_before


def test_models_without_the_pattern_are_left_alone_without_a_probe_pass(monkeypatch):
    """Compact upsamples by pixel shuffle: nothing to rewrite, and no probe forward is spent on it."""
    calls = []
    monkeypatch.setattr(nearest_upconv, "rewrite_nearest_upconvs",
                        lambda m: calls.append(m) or [])
    compact = GANUpscaler.load(bundled_model_path())
    assert compact.rewritten_upconvs == 0 and calls == []


def test_loader_rewrites_owned_models_but_not_a_borrowed_one(tmp_path):
    path = tmp_path / "rrdb_x4.pth"
    torch.save({"params_ema": _rrdb_x4_state_dict()}, path)
    ours = GANUpscaler.load(path)
    assert ours.rewritten_upconvs == 2
    borrowed = ModelLoader().load_from_file(str(path)).eval()  # e.g. ComfyUI's UpscaleModelLoader's
    wrapped = GANUpscaler.from_descriptor(borrowed)
    assert wrapped.rewritten_upconvs == 0
    assert sum(isinstance(m, nn.Upsample) for m in borrowed.model.modules()) == 2  # never changed
    image = torch.rand(1, 40, 36, 3)
    a, _ = upscale(ours, image)
    b, _ = upscale(wrapped, image)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.skipif(not X4PLUS.is_file(), reason=f"real RealESRGAN_x4plus weights not found at {X4PLUS}")
def test_real_x4plus_matches_spandrel_to_float_rounding():
    from skimage import data

    ours = GANUpscaler.load(X4PLUS)
    plain = ModelLoader().load_from_file(str(X4PLUS)).eval()
    assert ours.rewritten_upconvs == 2
    image = torch.from_numpy(data.coffee()[100:148, 200:264].copy()).float().div(255)[None]
    out, _ = upscale(ours, image)
    with torch.inference_mode():
        ref = plain(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert (out - ref.clamp(0, 1)).abs().max() * 255 < 1e-3
