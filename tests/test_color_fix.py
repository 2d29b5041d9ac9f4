"""Colour fix against a direct NumPy implementation of the published formulas (chain_of_zoom.md)."""
import numpy as np
import pytest
import torch
from skimage import data

from dreamforge_upscale.tiling import resize
from dreamforge_upscale.imaging.color_fix import color_fix
from reference_color_fix import np_adain, np_wavelet

def real_pair():
    """A real photo and a colour-shifted, slightly blurred 'upscale' of it."""
    ref = torch.from_numpy(data.coffee()[::4, ::4].copy()).float().div(255)[None]  # 100x150
    up = resize(ref, 200, 300, "bicubic")
    shifted = (up * torch.tensor([1.15, 0.9, 0.8]) + 0.05).clamp(0, 1)
    return shifted, ref


@pytest.mark.parametrize("method,reference_impl", [("wavelet", np_wavelet), ("adain", np_adain)])
def test_matches_direct_formula(method, reference_impl):
    image, ref = real_pair()
    ours = color_fix(image, ref, method)
    ref_resized = resize(ref, 200, 300, "bicubic")  # "the reference is resized to the image first"
    expected = reference_impl(image[0].double().numpy(), ref_resized[0].double().numpy())
    assert ours.shape == image.shape and ours.dtype == torch.float32
    assert np.abs(ours[0].numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_removes_colour_shift(method):
    image, ref = real_pair()
    target = resize(ref, 200, 300, "bicubic")
    before = (image.mean(dim=(1, 2)) - target.mean(dim=(1, 2))).abs().max()
    after = (color_fix(image, ref, method).mean(dim=(1, 2)) - target.mean(dim=(1, 2))).abs().max()
    assert before > 0.04 and after < 0.01


def test_rgba_and_batches():
    image, ref = real_pair()
    alpha = torch.rand(1, 200, 300, 1)
    out = color_fix(torch.cat([image, alpha], -1).repeat(2, 1, 1, 1), ref, "wavelet")
    assert out.shape == (2, 200, 300, 4)
    assert torch.equal(out[..., 3:], alpha.repeat(2, 1, 1, 1))  # alpha untouched
    per_image = color_fix(image, ref, "wavelet")
    assert torch.allclose(out[1, ..., :3], per_image[0], atol=1e-6)
    with pytest.raises(ValueError, match="reference batch"):
        color_fix(image.repeat(3, 1, 1, 1), ref.repeat(2, 1, 1, 1), "adain")
    with pytest.raises(ValueError, match="method must be one of"):
        color_fix(image, ref, "histogram")
    with pytest.raises(ValueError, match="non-empty"):
        color_fix(torch.zeros(1, 0, 4, 3), ref, "adain")


def test_large_images_run_plane_by_plane_with_the_same_result(monkeypatch):
    import importlib

    module = importlib.import_module("dreamforge_upscale.imaging.color_fix")  # the module, not the function

    image, ref = real_pair()
    whole = color_fix(image.repeat(2, 1, 1, 1), ref, "wavelet")
    monkeypatch.setattr(module, "PLANE_WISE_ABOVE", 0)  # force the memory-saving path
    planes = color_fix(image.repeat(2, 1, 1, 1), ref, "wavelet")
    assert torch.allclose(whole, planes, atol=1e-6)


def test_adain_on_a_single_pixel_is_finite():
    image, reference = torch.full((1, 1, 1, 3), 0.25), torch.full((1, 1, 1, 3), 0.75)
    out = color_fix(image, reference, "adain")
    assert torch.isfinite(out).all() and torch.allclose(out, reference)
