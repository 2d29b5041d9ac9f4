"""What each example workflow must produce from ComfyUI's example.png at 128 px, which the tests put in
input/ under that name (scripts/example_workflows.py): {workflow: {SaveImage/PreviewImage node id: (count, width,
height)}}. Used by tests/test_browser_ui.py and tests/test_example_workflows.py."""

INPUT_SIDE = 128

EXPECTED_OUTPUTS = {
    "upscale_bundled_x4": {"5": (1, 512, 512)},
    "upscale_photo_x4plus": {"5": (1, 512, 512)},
    "tiled_upscale_2x": {"4": (1, 256, 256)},
    "tiled_upscale_4x": {"4": (1, 512, 512)},
    "sdx4_tiled_4x": {"4": (1, 512, 512)},  # SD x4: always 4x
    "coz_prompt_loop": {"6": (5, 512, 512)},  # x0..x4 at process_size 512
    "coz_loop_gan": {"4": (5, 512, 512)},
    "coz_step_chain": {"5": (1, 512, 512), "6": (1, 512, 512)},
    "coz_upscale_2_5x": {"4": (1, 320, 320)},
    "coz_own_model": {"4": (5, 512, 512)},  # x0..x4 at process_size 512
    "color_fix_after_gan": {"5": (1, 512, 512), "6": (1, 512, 512)},
}

# Workflows that run here on tiny *random* weights under the real model's name (the SD x4 upscaler:
# models/diffusers/stable-diffusion-x4-upscaler, tests/tiny_sdx4.py; SD3 medium + the Chain-of-Zoom LoRA:
# tests/tiny_sd3.py): their pictures have the right size but show noise, so "scaled back down it is the
# input" does not apply; their receipts are checked instead.
RANDOM_WEIGHTS = {"sdx4_tiled_4x", "coz_own_model"}
