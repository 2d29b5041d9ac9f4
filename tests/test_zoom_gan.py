"""Chain-of-Zoom with a real 4x GAN (the bundled Real-ESRGAN Compact, realesr-animevideov3) on real photos."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dreamforge_upscale.upscalers import GANUpscaler, UpscalerError
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.zoom import ZoomSettings, prepare, to_pil, zoom_loop, zoom_step
from zoom_helpers import RecordingProvider, same_image

SIZE = 128  # process size: crops of 32 px, Compact runs them in a blink


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path())


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def colour_shifts(states: list[Image.Image]) -> np.ndarray:
    """Per state n >= 1 and channel: |mean(x_n) - mean(bicubic view of x_(n-1)'s centre)| in 8-bit levels."""
    lo, hi = (SIZE - SIZE // 4) // 2, (SIZE + SIZE // 4) // 2
    shifts = []
    for n in range(1, len(states)):
        view = states[n - 1].crop((lo, lo, hi, hi)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        shifts.append(np.abs(np.asarray(states[n], np.float64).mean((0, 1)) - np.asarray(view, np.float64).mean((0, 1))))
    return np.array(shifts)


def test_three_step_recursive_loop_on_a_real_photo_keeps_its_colours(compact):
    image = as_image(data.coffee())  # 600x400, non-square
    fixed = zoom_loop(compact, image, 3, ZoomSettings(mode="recursive", process_size=SIZE, color_fix="wavelet",
                                                     user_prompt="coffee"))
    raw = zoom_loop(compact, image, 3, ZoomSettings(mode="recursive", process_size=SIZE, color_fix="none"))
    for result in (fixed, raw):
        t = result.tensor()
        steps = result.receipt.to_dict()["step_receipts"]
        assert t.shape == (4, SIZE, SIZE, 3) and t.dtype == torch.float32
        assert [r["upscale"]["output_size"] for r in steps] == [[SIZE, SIZE]] * 3
        assert [r["sr_input_size"] for r in steps] == [[SIZE // 4, SIZE // 4]] * 3
        assert [r["step"] for r in steps] == [1, 2, 3]
    x0 = prepare(to_pil(image), SIZE)
    assert same_image(fixed.states[0][0], x0)
    # the states are really super-resolved, not copies of the bicubic view
    view1 = x0.crop((48, 48, 80, 80)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(fixed.states[0][1], np.int16) - np.asarray(view1, np.int16)).mean() > 1.0
    on, off = colour_shifts(fixed.states[0]), colour_shifts(raw.states[0])
    assert on.max() < 0.5, on  # under half an 8-bit level per channel with the colour fix
    assert off.max() > 1.0 and off.mean() > 4 * on.mean(), (on, off)
    receipt = fixed.receipt.to_dict()["step_receipts"][0]
    assert receipt["upscale"]["model"]["file"] == "realesr-animevideov3.pth"
    assert receipt["prompt"]["text"] == "coffee"
    assert receipt["upscale"]["prompt"]["text"] == "coffee" and receipt["upscale"]["prompt"]["used"] is False
    assert receipt["color_fix"]["method"] == "wavelet"
    assert raw.receipt.to_dict()["step_receipts"][0]["color_fix"] is None


def test_steps_chained_by_hand_reproduce_the_loop_with_the_gan(compact):
    image = as_image(data.astronaut()[0:300, 100:500])
    settings = ZoomSettings(mode="recursive_multiscale", process_size=SIZE, color_fix="adain", seed=3,
                            provider=RecordingProvider(), user_prompt="astronaut")
    loop = zoom_loop(compact, image, 3, settings)
    by_hand = dataclasses.replace(settings, provider=RecordingProvider())
    state = to_pil(image)
    prompts = []
    for n in range(1, 4):
        result = zoom_step(compact, state, n, by_hand)
        assert same_image(result.state, loop.states[0][n]), n
        prompts.append(result.prompt)
        state = result.state
    assert prompts == loop.prompts[0] == ["view1, astronaut,", "view2, astronaut,", "view3, astronaut,"]
    calls = settings.provider.calls
    assert len(calls) == 3 and all(len(c["images"]) == 2 for c in calls)
    for ours, theirs in zip(calls, by_hand.provider.calls):  # the prompt model saw the same images
        assert all(same_image(a, b) for a, b in zip(ours["images"], theirs["images"]))
    assert same_image(calls[0]["images"][0], loop.states[0][0])  # step 1 shows x0, then its zoomed view


def test_a_real_2x_gan_is_refused(tmp_path):
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    path = tmp_path / "compact_x2.pth"
    torch.save(SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict(), path)
    x2 = GANUpscaler.load(path)
    assert x2.scale == 2
    with pytest.raises(UpscalerError, match=r"compact_x2\.pth is native x2. Load a 4x model"):
        zoom_loop(x2, as_image(data.coffee()[:64, :64]), 1, ZoomSettings(process_size=64))
