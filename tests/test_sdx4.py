"""SD x4 backend on the CPU with tiny random components (the published layout, small widths)."""
import dataclasses

import pytest
import torch

import tiny_sdx4
from window_call import window
from dreamforge_upscale.tiling import RunHooks, TileOOMError
from dreamforge_upscale.upscalers import UpscaleRequest, UpscalerError, upscale
from dreamforge_upscale.upscalers.contract import ModelSource
from dreamforge_upscale.upscalers.sdx4 import SDX4Options, SDX4Upscaler
from dreamforge_upscale.upscalers.sdx4 import configs
from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer

STEPS = 3


def make_upscaler(seed=0, **widths) -> SDX4Upscaler:
    unet, vae, text = tiny_sdx4.build_components(seed, **widths)
    comps = SDX4Components(unet, vae, text, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir()))
    return SDX4Upscaler(comps, ModelSource("tiny-sdx4", None, "SD x4 upscaler (test)"))


@pytest.fixture(scope="module")
def tiny():
    return make_upscaler()


@pytest.fixture(scope="module")
def compact():
    from dreamforge_upscale.upscalers import GANUpscaler
    from dreamforge_upscale.assets.bundled_model import bundled_model_path

    return GANUpscaler.load(bundled_model_path())


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return torch.from_numpy(data.astronaut()[40:88, 200:264].copy()).float().div(255).permute(2, 0, 1)[None]


def test_configs_from_the_yaml_are_the_published_architecture():
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731 - shapes only
    sd = {
        configs.UNET_PREFIX + "input_blocks.0.0.weight": meta(256, 7, 3, 3),
        configs.UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": meta(512, 1024),
        configs.VAE_PREFIX + "encoder.conv_in.weight": meta(128, 3, 3, 3),
        configs.VAE_PREFIX + "decoder.conv_in.weight": meta(512, 4, 3, 3),
    }
    cfg = configs.sized_original_config(sd)
    unet = configs.unet_config(cfg, sd)
    assert unet["block_out_channels"] == [256, 512, 512, 1024] and unet["in_channels"] == 7
    assert unet["cross_attention_dim"] == 1024 and unet["attention_head_dim"] == 8
    assert unet["only_cross_attention"] == [True, True, True, False] and unet["num_class_embeds"] == 1000
    assert unet["down_block_types"][0] == "DownBlock2D" and unet["use_linear_projection"] is True
    vae = configs.vae_config(cfg, sd)
    assert vae["block_out_channels"] == [128, 256, 512] and vae["scaling_factor"] == 0.08333
    assert len(vae["up_block_types"]) == 3  # a 4x VAE, not SD's 8x


@pytest.mark.parametrize("guidance,negative", [(7.5, ""), (4.0, "blurry"), (1.0, "")])
def test_one_tile_equals_the_diffusers_pipeline(tiny, photo, guidance, negative):
    pipe = tiny_sdx4.pipeline(0)
    ref = pipe(prompt="an astronaut", image=photo, num_inference_steps=STEPS, guidance_scale=guidance, noise_level=20,
               negative_prompt=negative or None, generator=torch.Generator("cpu").manual_seed(7),
               output_type="pt").images
    report = {}
    out = window(tiny, photo, prompt="an astronaut", seed=7, report=report,
                 options=SDX4Options(steps=STEPS, guidance=guidance, negative_prompt=negative))
    assert report["unet_tiles"]["count"] == 1 and report["vae_tiles"]["count"] == 1
    assert out.shape == ref.shape == (1, 3, 192, 256)
    assert (out - ref).abs().max().item() <= 1e-4
    assert ref.std() > 0.05  # the reference is an image, not a constant


def test_same_seed_same_bits_other_seed_differs(tiny, photo):
    opts = SDX4Options(steps=2, tile=32, overlap=8)
    a = window(tiny, photo, prompt="x", seed=3, options=opts)
    b = window(tiny, photo, prompt="x", seed=3, options=opts)
    c = window(tiny, photo, prompt="x", seed=4, options=opts)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def _boundary_gradient_ratio(image: torch.Tensor, columns: list[int]) -> float:
    """Mean |horizontal step| at the given output columns over its mean everywhere (1 = no seam)."""
    step = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))
    return float(step[columns].mean() / step.mean())


def test_latent_tiles_blend_into_one_image_without_seams(tiny, photo):
    opts = SDX4Options(steps=STEPS, tile=24, overlap=12)
    report = {}
    tiled = window(tiny, photo, prompt="x", seed=1, options=opts, report=report)
    untiled = window(tiny, photo, prompt="x", seed=1, options=dataclasses.replace(opts, tile=0))
    assert report["unet_tiles"]["count"] > 1
    from dreamforge_upscale.tiling.latent_denoise import plan_latent

    cols = plan_latent(48, 64, 24, 12).cols
    assert cols.count > 2
    # tile edges (where independent tiles would show a seam), in output pixels
    edges = [4 * (s + cols.tile) - 1 for s in cols.starts[:-1]] + [4 * s - 1 for s in cols.starts[1:]]
    assert _boundary_gradient_ratio(tiled, edges) < 1.25
    # one coherent image: close to the untiled result overall, not a different picture per tile
    assert (tiled - untiled).abs().mean() < 0.1
    # independent tiles (what tiling without per-step blending gives) show their edges
    left = window(tiny, photo[..., :40], prompt="x", seed=1, options=dataclasses.replace(opts, tile=0))
    right = window(tiny, photo[..., 24:], prompt="x", seed=1, options=dataclasses.replace(opts, tile=0))
    naive = torch.cat([left[..., :128], right[..., 32:]], dim=-1)
    assert _boundary_gradient_ratio(naive, [127]) > _boundary_gradient_ratio(tiled, [127])


def test_tiled_decode_shares_groupnorm_statistics(tiny):
    from dreamforge_upscale.tiling.vae_tiles import decode_tiled

    vae = tiny.comps.vae
    torch.manual_seed(0)
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16), size=(48, 64), mode="bicubic") * 3 + 1

    def run(w):
        return (vae.decode(w, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.inference_mode():
        whole = run(z).permute(0, 2, 3, 1)
        shared = decode_tiled(run, norms, z, scale=4, tile=16, overlap=8, pad=16, device=z.device,
                              dtype=torch.float32, stats_side=64)
        own = decode_tiled(run, [], z, scale=4, tile=16, overlap=8, pad=16, device=z.device, dtype=torch.float32)
    assert shared.plan.count > 1 and shared.image.shape == whole.shape
    err_shared = (shared.image - whole).abs().mean().item()
    err_own = (own.image - whole).abs().mean().item()
    assert err_shared < 0.5 * err_own, (err_shared, err_own)
    assert err_shared < 0.006
    # one tone: per-tile mean offsets from the untiled decode stay small with shared statistics
    def tile_offsets(image):
        return torch.stack([(image - whole)[:, r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].mean()
                            for r in range(3) for c in range(4)]).abs().max().item()
    assert tile_offsets(shared.image) < tile_offsets(own.image)


def test_upscale_receipt_and_scale_two_downsamples(tiny, photo):
    image = photo.permute(0, 2, 3, 1)
    out, receipt = upscale(tiny, image,
                           UpscaleRequest(scale=2, prompt="a face", seed=5, options=SDX4Options(steps=2)))
    receipt = receipt.to_dict()
    assert out.shape == (1, 96, 128, 3)
    assert receipt["impl"] == "diffusion" and receipt["resampled"]["from_scale"] == 4 and receipt["seed"] == 5
    (only,) = receipt["passes"]
    assert only["tiles"] is None and only["backend"]["options"]["steps"] == 2 and only["backend"]["seed"] == 5
    assert only["backend"]["unet_tiles"]["count"] >= 1 and only["backend"]["vae_tiles"]["count"] >= 1
    assert only["prompts"] == [{"window": [0, 0, 64, 48], "text": "a face", "tile": None}]
    assert receipt["prompt"] == {"mode": "text", "text": "a face", "used": True, "note": None}
    with pytest.raises(UpscalerError, match="strict_scale: impl diffusion"):
        upscale(tiny, image, UpscaleRequest(scale=2, strict_scale=True))
    _, drawn = upscale(tiny, image[:, :8, :8], UpscaleRequest(options=SDX4Options(steps=1)))
    drawn = drawn.to_dict()
    assert drawn["prompt"]["used"] is True and drawn["prompt"]["text"] is None  # the model's default prompt
    assert isinstance(drawn["seed"], int) and drawn["seed"] == drawn["passes"][0]["backend"]["seed"]  # a drawn seed is recorded so the image can be reproduced


@pytest.mark.parametrize("kwargs,phrase", [
    ({"steps": 0}, "steps must be between"), ({"noise_level": 351}, "noise_level must be between 0 and 350"),
    ({"guidance": -1.0}, "guidance must be >= 0"), ({"tile": -8}, "must be >= 0"),
])
def test_bad_options_are_named(tiny, photo, kwargs, phrase):
    with pytest.raises(UpscalerError, match=phrase):
        window(tiny, photo[..., :8, :8], options=SDX4Options(**kwargs))


def test_progress_counts_steps_times_tiles_and_interrupt_stops(tiny, photo):
    from dreamforge_upscale.tiling.latent_denoise import plan_latent

    n = plan_latent(48, 64, 32, 8).count
    seen = []
    window(tiny, photo, seed=0, options=SDX4Options(steps=2, tile=32, overlap=8),
           hooks=RunHooks(progress=lambda d, t: seen.append((d, t))))
    assert n > 1 and seen == [(i, 2 * n) for i in range(1, 2 * n + 1)]  # steps x tiles

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) > n + 1:
            raise Stop

    with pytest.raises(Stop):
        window(tiny, photo, seed=0, options=SDX4Options(steps=50, tile=32, overlap=8),
               hooks=RunHooks(check_interrupt=interrupt))
    assert len(calls) == n + 2  # stopped mid-denoise: the second tile of the second step


class _OOMUNet(torch.nn.Module):
    """Stands in for a UNet on a device that is out of memory for every tile size."""

    def __init__(self, unet):
        super().__init__()
        self.inner, self.config, self.calls = unet, unet.config, 0

    def forward(self, *a, **k):
        self.calls += 1
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_out_of_memory_halves_tiles_then_falls_back_to_gan_then_lanczos(photo, compact):
    up = make_upscaler()
    up.comps.unet = _OOMUNet(up.comps.unet)
    image = photo.permute(0, 2, 3, 1)
    out, receipt = upscale(up, image,
                           UpscaleRequest(scale=4, options=SDX4Options(steps=2, tile=64), fallbacks=("gan",)),
                           gan=lambda: compact)
    receipt = receipt.to_dict()
    assert out.shape == (1, 192, 256, 3)
    assert [s["impl"] for s in receipt["fallbacks"]] == ["diffusion", "gan"]
    assert receipt["fallbacks"][0]["result"] == "out of memory" and receipt["impl"] == "gan"
    assert up.comps.unet.calls >= 2  # tried 64 -> 32 before giving up

    class OOMGan:
        def __init__(self, inner):
            self.__dict__.update(capabilities=inner.capabilities, source=inner.source, dtype=inner.dtype, inner=inner,
                                 offload=False)

        scale = property(lambda self: self.inner.scale)

        def module(self):
            return self.inner.module()

        def upscale_window(self, x, cond, hooks):
            raise torch.OutOfMemoryError("simulated")

        def describe(self):
            return self.inner.describe()

    with pytest.raises(TileOOMError, match="allocator: simulated"):  # a plain resize only where allowed
        upscale(up, image,
                UpscaleRequest(scale=3, options=SDX4Options(steps=1), fallbacks=("gan",)),
                gan=lambda: OOMGan(compact))
    out, receipt = upscale(up, image,
                           UpscaleRequest(scale=3, options=SDX4Options(steps=1), fallbacks=("gan", "resize")),
                           gan=lambda: OOMGan(compact))
    receipt = receipt.to_dict()
    assert out.shape == (1, 144, 192, 3) and receipt["impl"] == "resample"
    assert [s["impl"] for s in receipt["fallbacks"]] == ["diffusion", "gan", "resample"]
    assert receipt["degraded"]["instead_of"] == "diffusion" and receipt["degraded"]["ran"] == "resample"
    with pytest.raises(UpscalerError, match="strict_scale forbids falling back"):
        upscale(up, image,
                UpscaleRequest(scale=4, strict_scale=True, options=SDX4Options(steps=1), fallbacks=("gan",)),
                gan=lambda: compact)
    assert torch.equal(image, photo.permute(0, 2, 3, 1))  # the input is untouched


def test_single_file_and_diffusers_folder_load_offline(tmp_path, photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = tiny_sdx4.write_single_file(tmp_path / "x4-upscaler-ema.safetensors", seed=2)
    folder = tiny_sdx4.write_diffusers_folder(tmp_path / "stable-diffusion-x4-upscaler", seed=2)
    opts = SDX4Options(steps=2)
    from_file = SDX4Upscaler.load(single, tokenizer_dir=tiny_sdx4.clip_tokenizer_dir(), device=torch.device("cpu"))
    from_folder = SDX4Upscaler.load(folder, device=torch.device("cpu"))
    expected = make_upscaler(seed=2)
    for name, p in expected.comps.unet.state_dict().items():
        assert torch.equal(from_file.comps.unet.state_dict()[name], p), name
    for name, p in expected.comps.text_encoder.state_dict().items():
        assert torch.equal(from_file.comps.text_encoder.state_dict()[name], p), name
    a = window(from_file, photo, prompt="x", seed=1, options=opts)
    b = window(from_folder, photo, prompt="x", seed=1, options=opts)
    c = window(expected, photo, prompt="x", seed=1, options=opts)
    assert torch.equal(a, c) and (b - c).abs().max() < 1e-5
    assert from_file.source.sha256 and from_file.source.file == single.name
    with pytest.raises(UpscalerError, match="CLIP tokenizer files vocab.json and merges.txt were not found"):
        SDX4Upscaler.load(single, tokenizer_dir=tmp_path / "nowhere", device=torch.device("cpu"))


def test_impl_policy_and_operator_default(monkeypatch):
    from dreamforge_upscale.upscalers.impl_policy import choose_run, default_impl, pick_gan, strict_scale_error

    def head(choice, n):
        return (choice.impl, choice.use_loaded, choice.gan_scale)[:n]

    assert head(choose_run("auto", 2, "diffusion"), 3) == ("gan", False, 2)
    assert head(choose_run("auto", 4, "diffusion"), 2) == ("diffusion", True)
    assert head(choose_run("auto", 2, "gan"), 2) == ("gan", True)
    assert head(choose_run("gan", 4, "diffusion"), 3) == ("gan", False, 4)
    assert head(choose_run("diffusion", 2, "diffusion"), 2) == ("diffusion", True)
    with pytest.raises(UpscalerError, match="impl 'diffusion' needs the Stable Diffusion x4 upscaler"):
        choose_run("diffusion", 4, "gan")
    assert strict_scale_error("diffusion", 2) and strict_scale_error("diffusion", 3)
    assert strict_scale_error("diffusion", 4) is None and strict_scale_error("diffusion", 16) is None
    assert strict_scale_error("gan", 2) is None  # decided by the GAN's own native scale at run time
    names = ["realesr-animevideov3.pth", "RealESRGAN_x4plus.pth", "x4-upscaler-ema.safetensors", "RealESRGAN_x2plus.pth"]
    assert pick_gan(names, 2) == "RealESRGAN_x2plus.pth" and pick_gan(names, 4) == "RealESRGAN_x4plus.pth"
    assert pick_gan(["4x_NMKD.pth"], 2) == "4x_NMKD.pth" and pick_gan(["realesr-animevideov3.pth"], 4) is None
    monkeypatch.delenv("DREAMFORGE_DEFAULT_IMPL", raising=False)
    assert default_impl() == "auto"
    monkeypatch.setenv("DREAMFORGE_DEFAULT_IMPL", "Diffusion")
    assert default_impl() == "diffusion"
    monkeypatch.setenv("DREAMFORGE_DEFAULT_IMPL", "fast")
    with pytest.raises(UpscalerError, match="DREAMFORGE_DEFAULT_IMPL='fast'"):
        default_impl()
