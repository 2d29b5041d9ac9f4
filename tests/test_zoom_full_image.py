"""Chain-of-Zoom for the whole image at an arbitrary scale: exact sizes, passes, the max-side guard,
per-tile prompts, colour fix per pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from dreamforge_upscale.tiling import plan_tiles
from dreamforge_upscale.upscalers import GANUpscaler, UpscalerError
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.zoom import TWO_IMAGE_INSTRUCTION, SINGLE_IMAGE_INSTRUCTION, passes_for, zoom_upscale
from dreamforge_upscale.imaging.image_io import to_pil
from zoom_helpers import BicubicX4, RecordingProvider, same_image


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path())


def photo(h: int, w: int) -> torch.Tensor:
    return torch.from_numpy(data.chelsea()[100:100 + h, 150:150 + w].astype(np.float32) / 255)[None]


@pytest.mark.parametrize("scale,passes", [(1.5, 1), (2, 1), (2.5, 1), (4, 1), (5, 2), (16, 2)])
@pytest.mark.parametrize("h,w", [(9, 13), (13, 9)])
def test_exact_sizes_and_pass_count_with_a_real_gan(compact, scale, passes, h, w):
    out, receipt = zoom_upscale(compact, photo(h, w), scale, user_prompt="a cat")
    receipt = receipt.to_dict()
    assert out.shape == (1, round(h * scale), round(w * scale), 3)
    assert receipt["output_size"] == [round(w * scale), round(h * scale)]
    assert receipt["pass_count"] == passes == len(receipt["passes"]) == math.ceil(math.log(scale, 4) - 1e-9)
    assert [p["index"] for p in receipt["passes"]] == list(range(1, passes + 1))
    sizes = [p["output_size"] for p in receipt["passes"]]
    assert sizes == [[w * 4 ** p, h * 4 ** p] for p in range(1, passes + 1)]
    # the GAN was given the text but takes none: recorded, and said to be unused
    assert all(p["upscale"]["prompt"]["mode"] == "text" and p["upscale"]["prompt"]["text"] == "a cat"
               and p["upscale"]["prompt"]["used"] is False and p["upscale"]["passes"][0]["prompts"] == []
               for p in receipt["passes"])
    assert (receipt["resampled"] is None) == (scale in (4, 16))
    assert out.min() >= 0 and out.max() <= 1


def test_pass_count_is_exact_at_powers_of_four():
    assert [passes_for(s) for s in (1, 1.01, 4, 4.0001, 16, 64, 256)] == [0, 1, 1, 2, 2, 3, 4]


def test_max_side_guard_refuses_before_any_work():
    model = BicubicX4()
    with pytest.raises(UpscalerError, match=r"13x9 image into 208x144, over max_side 200 px: lower the scale"):
        zoom_upscale(model, photo(9, 13), 16, max_side=200)
    assert model.calls == []  # nothing ran
    out, _ = zoom_upscale(model, photo(9, 13), 16, max_side=208)  # the limit itself is allowed
    assert out.shape == (1, 144, 208, 3)


def test_default_max_side_is_8192():
    model = BicubicX4()
    with pytest.raises(UpscalerError, match="over max_side 8192 px"):
        zoom_upscale(model, torch.zeros(1, 40, 33, 3), 256)  # 40 x 256 = 10240 px
    assert model.calls == []


def test_per_tile_prompts_called_once_per_tile_and_reach_the_upscaler():
    image = photo(28, 40)
    provider = RecordingProvider()
    model = BicubicX4(prompted=True)
    out, receipt = zoom_upscale(model, image, 5, user_prompt="cat", provider=provider, tile=16, overlap=4,
                                color_fix="none", seed=11)
    receipt = receipt.to_dict()
    assert out.shape == (1, 140, 200, 3)
    assert all(p["upscale"]["prompt"]["mode"] == "per_tile" and p["upscale"]["prompt"]["used"] is True
               for p in receipt["passes"])
    per_pass = [p["upscale"]["passes"][0]["prompts"] for p in receipt["passes"]]
    counts = [p["upscale"]["passes"][0]["tiles"]["count"] for p in receipt["passes"]]
    assert counts == [plan_tiles(28, 40, 16, 4).count, plan_tiles(112, 160, 16, 4).count]
    assert counts[0] > 1 and len(provider.calls) == sum(counts)  # exactly one prompt call per tile
    assert [len(t) for t in per_pass] == counts
    # each tile's call showed the whole pass input, then that tile's window, with the two-image instruction
    done = 0
    for p, tiles in enumerate(per_pass):
        wholes = []
        for tile in tiles:
            call = provider.calls[done]
            done += 1
            assert call["instruction"] == TWO_IMAGE_INSTRUCTION and len(call["images"]) == 2
            whole, crop = call["images"]
            wholes.append(whole)
            assert same_image(crop, whole.crop(tuple(tile["window"])))
            assert tile["text"] == f"view{done}, cat,"
        assert all(same_image(w, wholes[0]) for w in wholes)
        assert wholes[0].size == [(40, 28), (160, 112)][p]
        if p == 0:
            assert same_image(wholes[0], to_pil(image))
    windows = [tuple(t["window"]) for t in per_pass[0]]
    assert len(set(windows)) == len(windows)  # (context 0: every tile has its own window) none repeated
    # the upscaler got every tile's own prompt, in tile order, and the pass seed
    assert [c["prompt"] for c in model.calls] == [t["text"] for tiles in per_pass for t in tiles]
    grids = [p["upscale"]["passes"][0]["tiles"]["grid"] for p in receipt["passes"]]
    assert [[t["tile"] for t in tiles] for tiles in per_pass] == [
        [[r, c] for r in range(rows) for c in range(cols)] for rows, cols in grids]  # every tile, in order
    seeds = [c["seed"] for c in model.calls]
    assert len(set(seeds[:counts[0]])) == 1 and seeds[0] != seeds[-1]


def test_one_prompt_per_pass_when_tile_prompts_is_off():
    provider = RecordingProvider()
    model = BicubicX4(prompted=True)
    _, receipt = zoom_upscale(model, photo(28, 40), 16, provider=provider, tile=16, overlap=4, tile_prompts=False)
    receipt = receipt.to_dict()
    assert len(provider.calls) == 2
    assert all(c["instruction"] == SINGLE_IMAGE_INSTRUCTION and len(c["images"]) == 1 for c in provider.calls)
    assert [p["upscale"]["prompt"]["text"] for p in receipt["passes"]] == ["view1", "view2"]
    assert [[t["text"] for t in p["upscale"]["passes"][0]["prompts"]] for p in receipt["passes"]] == [
        ["view1"], ["view2"]]
    assert {c["prompt"] for c in model.calls} == {"view1", "view2"}


def test_colour_fix_runs_per_pass():
    gains = (1.3, 0.8, 1.0)
    image = photo(24, 32)
    fixed, _ = zoom_upscale(BicubicX4(gains=gains), image, 16, color_fix="wavelet")
    raw, _ = zoom_upscale(BicubicX4(gains=gains), image, 16, color_fix="none")
    target = image.mean(dim=(0, 1, 2))
    assert (fixed.mean(dim=(0, 1, 2)) - target).abs().max() < 2 / 255
    assert (raw.mean(dim=(0, 1, 2)) - target).abs().max() > 20 / 255  # the cast compounds over two passes


def test_rgba_keeps_alpha_and_batches_work(compact):
    rgb = torch.cat([photo(9, 13), photo(9, 13).flip(2)])
    alpha = torch.linspace(0, 1, 13).view(1, 1, 13, 1).expand(2, 9, 13, 1)
    out, receipt = zoom_upscale(compact, torch.cat([rgb, alpha], dim=-1), 2.5)
    receipt = receipt.to_dict()
    assert out.shape == (2, 22, 32, 4) and receipt["batch"] == 2 and receipt["alpha"]
    assert [(p["image"], p["index"]) for p in receipt["passes"]] == [(0, 1), (1, 1)]
    assert torch.allclose(out[0, :, :, 3], out[1, :, :, 3]) and out[0, 0, -1, 3] > 0.9 and out[0, 0, 0, 3] < 0.1
    assert not torch.allclose(out[0, ..., :3], out[1, ..., :3])


@pytest.mark.parametrize("kwargs,phrase", [
    ({"scale": 0.5}, "scale must be between 1 and 256"),
    ({"scale": float("nan")}, "scale must be between"),
    ({"color_fix": "lab"}, "color_fix must be one of"),
    ({"resample": "nearest"}, "resample must be one of"),
    ({"max_side": 0}, "max_side must be a positive"),
])
def test_bad_inputs_raise_clear_errors(kwargs, phrase):
    args = {"scale": 2.0, **kwargs}
    with pytest.raises(UpscalerError, match=phrase):
        zoom_upscale(BicubicX4(), photo(9, 13), args.pop("scale"), **args)
    with pytest.raises(UpscalerError, match="needs a 4x upscaler"):
        zoom_upscale(BicubicX4(scale=2), photo(9, 13), 2.0)
