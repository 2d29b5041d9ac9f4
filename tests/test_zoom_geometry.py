"""Chain-of-Zoom geometry against an independent re-implementation of the published script.

`published_chain` below restates inference_coz.py's per-image loop with PIL (the reference code works
on 8-bit PIL images and re-reads every state from a PNG): resize_and_center_crop, the centre box
((w - w//s)//2, (h - h//s)//2, (w + w//s)//2, (h + h//s)//2), BICUBIC / NEAREST resizes, and which
images the prompt model is shown. The SR call is made by a 4x model on the low-resolution crop the
published bicubic view is enlarged from (the crop itself; for onestep the crop BICUBIC-resized to
w/4). With the deterministic 4x model "PIL bicubic" the pack's states must equal it pixel for pixel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dreamforge_upscale.upscalers import UpscalerError
from dreamforge_upscale.zoom import (
    MODES, SINGLE_IMAGE_INSTRUCTION, TWO_IMAGE_INSTRUCTION, ZoomSettings, compose_prompt, derive_seed, from_pil,
    prepare, zoom_loop, zoom_step,
)
from reference_color_fix import np_wavelet
from zoom_helpers import BicubicX4, RecordingProvider, same_image

BICUBIC, NEAREST, LANCZOS = Image.Resampling.BICUBIC, Image.Resampling.NEAREST, Image.Resampling.LANCZOS


# ------------------------------------------------------------------------------ the reference
def published_resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    img = img.resize((new_w, new_h), LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def published_chain(image: Image.Image, mode: str, rec_num: int, size: int, sr4):
    """(states, prompt images per SR step, crop boxes) as inference_coz.py makes them."""
    states = [published_resize_and_center_crop(image, size)]
    prompt_images, boxes = [], []
    for rec in range(rec_num):
        if mode in ("nearest", "bicubic", "onestep"):
            start, rscale = states[0], 4 ** (rec + 1)
        else:
            start, rscale = states[rec], 4
        w, h = start.size
        new_w, new_h = w // rscale, h // rscale
        box = ((w - new_w) // 2, (h - new_h) // 2, (w + new_w) // 2, (h + new_h) // 2)
        boxes.append(box)
        cropped = start.crop(box)
        if mode == "nearest":
            states.append(cropped.resize((w, h), NEAREST))
            continue
        if mode == "bicubic":
            states.append(cropped.resize((w, h), BICUBIC))
            continue
        view = cropped.resize((w, h), BICUBIC)  # the published SR input and prompt image
        prompt_images.append([start, view] if mode == "recursive_multiscale" else [view])
        low = cropped.resize((w // 4, h // 4), BICUBIC) if mode == "onestep" else cropped
        states.append(sr4(low))
    return states, prompt_images, boxes


def pil_bicubic_x4(im: Image.Image) -> Image.Image:
    return im.resize((im.width * 4, im.height * 4), BICUBIC)


def photo(w: int, h: int) -> torch.Tensor:
    """A real photo crop as a 1,H,W,3 IMAGE (8-bit values, like ComfyUI's LoadImage)."""
    arr = data.astronaut()[10:10 + h, 60:60 + w]
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def pil_photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(data.astronaut()[10:10 + h, 60:60 + w])


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w,h,size", [(300, 220, 64), (180, 260, 128)])
def test_every_mode_matches_the_published_steps_exactly(mode, w, h, size):
    steps = 3
    provider = RecordingProvider()
    model = BicubicX4()
    settings = ZoomSettings(mode=mode, process_size=size, color_fix="none", provider=provider, user_prompt="photo")
    result = zoom_loop(model, photo(w, h), steps, settings)
    ref_states, ref_prompt_images, ref_boxes = published_chain(pil_photo(w, h), mode, steps, size, pil_bicubic_x4)

    states = result.states[0]
    assert len(states) == steps + 1
    for n, (ours, ref) in enumerate(zip(states, ref_states)):
        assert ours.size == ref.size == (size, size), n
        assert same_image(ours, ref), (mode, n, np.abs(np.asarray(ours, np.int16) - np.asarray(ref, np.int16)).max())
    boxes = [tuple(r["crop"]["box"]) for r in result.receipt.to_dict()["step_receipts"]]
    assert boxes == ref_boxes
    # the prompt model saw exactly the published images, with the published instruction
    assert len(provider.calls) == len(ref_prompt_images)
    for call, ref_images in zip(provider.calls, ref_prompt_images):
        assert len(call["images"]) == len(ref_images)
        assert all(same_image(a, b) for a, b in zip(call["images"], ref_images))
        expected = TWO_IMAGE_INSTRUCTION if len(ref_images) == 2 else SINGLE_IMAGE_INSTRUCTION
        assert call["instruction"] == expected
    sr_calls = len(model.calls)
    assert sr_calls == (0 if mode in ("nearest", "bicubic") else steps)
    expected_prompts = [] if mode in ("nearest", "bicubic") else [f"view{i}, photo," for i in range(1, steps + 1)]
    assert [p for p in result.prompts[0] if p] == expected_prompts


def test_recursive_with_a_bicubic_model_is_the_published_script_with_an_identity_model():
    """Tie to the published code directly: its SR model takes the bicubic view; with an identity SR the
    state is the view itself, which a bicubic 4x model on the crop reproduces exactly."""
    size, steps = 512, 4
    image = pil_photo(500, 400)
    x = [published_resize_and_center_crop(image, size)]
    for _ in range(steps):
        x.append(x[-1].crop((192, 192, 320, 320)).resize((size, size), BICUBIC))  # the documented 128 box at (192,192)
    result = zoom_loop(BicubicX4(), photo(500, 400), steps, ZoomSettings(mode="recursive", color_fix="none"))
    receipt = result.receipt.to_dict()
    assert [r["crop"]["box"] for r in receipt["step_receipts"]] == [[192, 192, 320, 320]] * steps
    assert [r["crop"]["source"] for r in receipt["step_receipts"]] == ["x0", "x1", "x2", "x3"]
    assert all(same_image(a, b) for a, b in zip(result.states[0], x))
    assert receipt["magnifications"] == [1, 4, 16, 64, 256]


def test_colour_fix_runs_per_step_against_that_steps_bicubic_view():
    size, steps = 64, 3
    gains = (1.25, 0.8, 1.0)  # the "model" casts a colour: red up, green down
    model = BicubicX4(gains=gains)
    result = zoom_loop(model, photo(300, 220), steps, ZoomSettings(mode="recursive", process_size=size,
                                                                   color_fix="wavelet"))
    states = result.states[0]
    for n in range(1, steps + 1):
        crop = states[n - 1].crop((24, 24, 40, 40))
        view = np.asarray(crop.resize((size, size), BICUBIC), np.float64) / 255
        sr = np.clip(np.asarray(pil_bicubic_x4(crop), np.float64) / 255 * np.array(gains), 0, 1)
        expected = np.round(np_wavelet(sr, view) * 255)
        ours = np.asarray(states[n], np.float64)
        # float32 (ours) vs float64 (here) may round a value sitting on .5 differently: 1 level at most
        assert np.abs(ours - expected).max() <= 1, n
        assert np.abs(ours.mean(axis=(0, 1)) / 255 - view.mean(axis=(0, 1))).max() < 1 / 255
        assert np.abs(sr.mean(axis=(0, 1)) - view.mean(axis=(0, 1))).max() > 10 / 255  # the cast was real


def test_preparation_short_side_exact_where_the_published_int_truncates():
    """For a 49 px short side the published int(49 * (64 / 49)) is 63: its crop pads a black top row.
    The pack sets the short side to exactly process_size (the long side is truncated as published)."""
    image = pil_photo(90, 49)
    published = published_resize_and_center_crop(image, 64)
    # the bug is real: 63 rows, crop top (63 - 64) // 2 = -1, so row 0 is black padding
    assert int(49 * (64 / 49)) == 63 and np.asarray(published)[0].max() == 0
    ours = prepare(image, 64)
    expected_w = int(90 * (64 / 49))
    manual = image.resize((expected_w, 64), LANCZOS)
    left = (expected_w - 64) // 2
    assert same_image(ours, manual.crop((left, 0, left + 64, 64)))
    assert np.asarray(ours)[0].max() > 0
    # where the published arithmetic is exact, both agree
    assert same_image(prepare(pil_photo(300, 220), 64), published_resize_and_center_crop(pil_photo(300, 220), 64))


def test_preparation_is_a_no_op_on_a_prepared_state():
    x0 = prepare(pil_photo(300, 220), 128)
    assert same_image(prepare(x0, 128), x0)


def test_steps_chained_by_hand_equal_the_loop_and_seeds_are_derived_per_step():
    settings = ZoomSettings(mode="recursive_multiscale", process_size=64, color_fix="wavelet", seed=7,
                            user_prompt="a photo")
    loop_model = BicubicX4(prompted=True, gains=(1.1, 1.0, 0.9))
    loop = zoom_loop(loop_model, photo(300, 220), 3, settings)
    step_model = BicubicX4(prompted=True, gains=(1.1, 1.0, 0.9))
    state = prepare(pil_photo(300, 220), 64)
    for n in range(1, 4):
        result = zoom_step(step_model, state, n, settings)
        assert same_image(result.state, loop.states[0][n])
        state = result.state
    assert [c["seed"] for c in loop_model.calls] == [derive_seed(7, n, 0) for n in (1, 2, 3)]
    assert step_model.calls == loop_model.calls
    assert len({c["seed"] for c in loop_model.calls}) == 3
    assert [c["prompt"] for c in loop_model.calls] == ["a photo"] * 3  # null provider: the user prompt
    other = zoom_loop(BicubicX4(prompted=True), photo(300, 220), 1,
                      ZoomSettings(mode="recursive", process_size=64, seed=8))
    assert other.receipt.to_dict()["step_receipts"][0]["seed"] != loop.receipt.to_dict()["step_receipts"][0]["seed"]


def test_onestep_and_baselines_need_x0_in_a_step():
    x1 = prepare(pil_photo(300, 220), 64)
    with pytest.raises(UpscalerError, match="origin"):
        zoom_step(BicubicX4(), x1, 2, ZoomSettings(mode="onestep", process_size=64))
    ok = zoom_step(BicubicX4(), x1, 2, ZoomSettings(mode="bicubic", process_size=64), origin=x1)
    assert ok.receipt.to_dict()["crop"] == {"source": "x0", "box": [30, 30, 34, 34], "factor": 16}  # 64 // 16 = 4 px


def test_prompt_format_is_the_published_one():
    assert compose_prompt("cat, fur", "sharp photo") == "cat, fur, sharp photo,"
    assert compose_prompt("cat, fur", "") == "cat, fur"  # the reference drops an empty user prompt
    assert compose_prompt(None, "sharp photo") == "sharp photo"  # null provider


@pytest.mark.parametrize("kwargs,steps,phrase", [
    ({"mode": "zoom"}, 2, "mode must be one of"),
    ({"process_size": 100}, 2, "multiple of 8"),
    ({"color_fix": "lab"}, 2, "color_fix must be one of"),
    ({"mode": "onestep", "process_size": 64}, 4, "fewer steps or a larger process_size"),
    ({}, 9, "steps must be 1..8"),
])
def test_bad_settings_raise_clear_errors(kwargs, steps, phrase):
    with pytest.raises(UpscalerError, match=phrase):
        zoom_loop(BicubicX4(), photo(80, 70), steps, ZoomSettings(**kwargs))


def test_a_2x_upscaler_is_refused_naming_the_fix():
    with pytest.raises(UpscalerError, match=r"needs a 4x upscaler; bicubic-x2 \(test\) is native x2"):
        zoom_loop(BicubicX4(scale=2), photo(80, 70), 2, ZoomSettings(process_size=64))
    # the interpolation baselines need no model at all
    assert zoom_loop(None, photo(80, 70), 2, ZoomSettings(mode="nearest", process_size=64)).tensor().shape == (3, 64, 64, 3)


def test_loop_output_is_image_major_for_a_batch():
    batch = torch.cat([photo(80, 70), photo(80, 70).flip(2)])
    result = zoom_loop(BicubicX4(), batch, 2, ZoomSettings(mode="recursive", process_size=64, color_fix="none"))
    t = result.tensor()
    assert t.shape == (6, 64, 64, 3)
    assert torch.equal(t[3], from_pil(prepare(Image.fromarray(data.astronaut()[10:80, 60:140][:, ::-1]), 64))[0])
    assert [(r["image"], r["step"]) for r in result.receipt.to_dict()["step_receipts"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
