"""The vision-language prompt provider with a tiny random Qwen2-VL built from a config (tests/tiny_vlm.py).

The weights are random, so the words are nonsense; what is checked is the plumbing: the published
chat (instruction as the system message, only image(s) in the user turn), the number of images the
processor encodes, that text comes back, determinism at temperature 0, seeded sampling above it, and
clear errors for folders that are not vision-language models.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dreamforge_upscale.upscalers import UpscalerError
from dreamforge_upscale.zoom import (
    SINGLE_IMAGE_INSTRUCTION, TWO_IMAGE_INSTRUCTION, ZoomSettings, make_prompt, zoom_loop,
)
from dreamforge_upscale.zoom.prompts import build_messages
from dreamforge_upscale.zoom.vlm import VLMPromptProvider
from tiny_vlm import save_tiny_vlm
from zoom_helpers import BicubicX4

USER_TURN = "<|im_start|>user\n"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("llm") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return VLMPromptProvider.load(vlm_dir, max_new_tokens=6)


def photo(y: int, x: int, side: int = 64) -> Image.Image:
    return Image.fromarray(data.astronaut()[y:y + side, x:x + side])


def expected_chat(instruction: str, images: int) -> str:
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n{USER_TURN}{vision}<|im_end|>\n"
            "<|im_start|>assistant\n")


def test_published_messages():
    one = build_messages(SINGLE_IMAGE_INSTRUCTION, 1)
    two = build_messages(TWO_IMAGE_INSTRUCTION, 2)
    assert one == [{"role": "system", "content": "What is in this image? Give me a set of words."},
                   {"role": "user", "content": [{"type": "image"}]}]
    assert two[0] == {"role": "system", "content": "The second image is a zoom-in of the first image. Based on this "
                                                    "knowledge, what is in the second image? Give me a set of words."}
    assert two[1] == {"role": "user", "content": [{"type": "image"}, {"type": "image"}]}


@pytest.mark.parametrize("count", [1, 2])
def test_chat_and_image_count_then_text_comes_back(vlm, count):
    images = [photo(0, 100), photo(100, 200)][:count]
    instruction = SINGLE_IMAGE_INSTRUCTION if count == 1 else TWO_IMAGE_INSTRUCTION
    result = vlm.run(images, instruction)
    assert result.chat == expected_chat(instruction, count)  # rendered by the model's own chat template
    user_turn = result.chat.split(USER_TURN, 1)[1].split("<|im_end|>", 1)[0]
    assert user_turn.replace("<|vision_start|><|image_pad|><|vision_end|>", "") == ""  # images only, no text
    assert result.image_count == count and len(result.image_grid) == count  # the processor encoded each image
    assert 1 <= result.new_tokens <= 6
    assert isinstance(result.text, str) and result.text.strip()
    assert "<|" not in result.text  # special tokens are stripped


def test_greedy_at_temperature_zero_is_deterministic(vlm, vlm_dir):
    images = [photo(0, 100), photo(100, 200)]
    first = vlm.describe(images, TWO_IMAGE_INSTRUCTION)
    assert vlm.describe(images, TWO_IMAGE_INSTRUCTION) == first
    assert vlm.describe(images, TWO_IMAGE_INSTRUCTION, seed=123) == first  # greedy ignores the seed
    reloaded = VLMPromptProvider.load(vlm_dir, max_new_tokens=6)
    assert reloaded.describe(images, TWO_IMAGE_INSTRUCTION) == first
    # ...and it looks at the pixels: a different image changes the (random-weight) answer
    others = {vlm.describe([photo(y, x)], SINGLE_IMAGE_INSTRUCTION, max_new_tokens=12)
              for y, x in ((0, 0), (200, 200), (400, 50), (300, 400))}
    assert len(others) > 1


def test_sampling_above_zero_follows_the_seed(vlm):
    image = [photo(50, 150)]
    a = vlm.describe(image, SINGLE_IMAGE_INSTRUCTION, seed=1, temperature=1.0, max_new_tokens=16)
    assert vlm.describe(image, SINGLE_IMAGE_INSTRUCTION, seed=1, temperature=1.0, max_new_tokens=16) == a
    others = {vlm.describe(image, SINGLE_IMAGE_INSTRUCTION, seed=s, temperature=1.0, max_new_tokens=16)
              for s in (2, 3, 4)}
    assert others - {a}
    state = torch.random.get_rng_state()
    vlm.describe(image, SINGLE_IMAGE_INSTRUCTION, seed=9, temperature=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_final_prompt_is_generated_then_user_prompt(vlm):
    image = [photo(0, 100)]
    text, generated = make_prompt(vlm, image, "sharp photo")
    assert generated == vlm.describe(image, SINGLE_IMAGE_INSTRUCTION)
    assert text == f"{generated}, sharp photo,"


def test_loop_prompts_come_from_the_vlm_on_the_published_images(vlm):
    image = torch.from_numpy(data.astronaut()[:200, 150:400].astype(np.float32) / 255)[None]
    result = zoom_loop(BicubicX4(), image, 2, ZoomSettings(mode="recursive_multiscale", process_size=64,
                                                          provider=vlm, user_prompt="astronaut"))
    x0, x1 = result.states[0][:2]
    for n, prev in ((1, x0), (2, x1)):
        view = prev.crop((24, 24, 40, 40)).resize((64, 64), Image.Resampling.BICUBIC)
        expected = vlm.describe([prev, view], TWO_IMAGE_INSTRUCTION)
        receipt = result.receipt.to_dict()["step_receipts"][n - 1]["prompt"]
        assert receipt["generated"] == expected and receipt["images"] == 2
        assert receipt["provider"] == "vlm:tiny-qwen2-vl"
        assert result.prompts[0][n - 1] == f"{expected}, astronaut,"


def test_interrupt_stops_generation(vlm):
    class Stop(Exception):
        pass

    def interrupt():
        raise Stop

    with pytest.raises(Stop):
        vlm.describe([photo(0, 0)], SINGLE_IMAGE_INSTRUCTION, check_interrupt=interrupt)


def test_folders_that_are_not_vision_language_models_are_refused(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(UpscalerError, match="no config.json"):
        VLMPromptProvider.load(tmp_path)
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UpscalerError, match="not an image-text-to-text"):
        VLMPromptProvider.load(tmp_path / "gpt2")


@pytest.mark.parametrize("kwargs,phrase", [({"max_new_tokens": 0}, "max_new_tokens"),
                                           ({"temperature": -1.0}, "temperature")])
def test_bad_generation_settings(vlm, kwargs, phrase):
    with pytest.raises(UpscalerError, match=phrase):
        vlm.describe([photo(0, 0)], SINGLE_IMAGE_INSTRUCTION, **kwargs)
