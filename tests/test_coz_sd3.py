"""Chain-of-Zoom's SD3 super-resolver (upscalers/coz_sd3) on tiny random SD3 components, outside ComfyUI.

The reference below is written from the published formulas with the LoRA left UNMERGED (peft for the
VAE encoder, explicit up @ down on the AdaLayerNormZero linears) and diffusers' own SD3 prompt encoding.
"""
from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd3
from dreamforge_upscale.tiling import RunHooks, plan_tiles
from dreamforge_upscale.tiling.memory import BUDGET_FRACTION, choose_tile
from dreamforge_upscale.runtime.errors import UpscalerError
from dreamforge_upscale.upscalers.contract import Conditioning, RunMemo, WindowResult
from dreamforge_upscale.upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler, TokenizerDirs, select_dtypes, step
from dreamforge_upscale.upscalers.coz_sd3.backend import NO_T5_NOTE
from dreamforge_upscale.upscalers.coz_sd3.lora import merge_transformer_lora, merge_vae_encoder_lora
from dreamforge_upscale.upscalers.upscale import upscale
from dreamforge_upscale.upscalers.request import UpscaleRequest

CPU = torch.device("cpu")
PROMPT = "a red fox in the snow, detailed fur"
SEED = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coz-sd3")
    return {"folder": tiny_sd3.write_diffusers_folder(root / "sd3-medium"),
            **tiny_sd3.write_single_files(root / "single"), "lora": tiny_sd3.write_lora_files(root / "lora"),
            "root": root}


def dirs() -> TokenizerDirs:
    return TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir())


def load(files, base=None, transformer_lora=None, vae_lora=None, **kw) -> CoZSD3Upscaler:
    return CoZSD3Upscaler.load(base or files["folder"], transformer_lora or files["lora"]["transformer"],
                               vae_lora or files["lora"]["vae"], tokenizer_dirs=dirs(), device=CPU, **kw)


@pytest.fixture(scope="module")
def model(files):
    return load(files)


@pytest.fixture(scope="module")
def reference():
    """Tiny SD3 with the LoRA unmerged: peft-wrapped encoder from the file, hooks adding up @ down."""
    comps = tiny_sd3.build_components(0)
    return comps


def run(model, x, prompt=PROMPT, seed=SEED, options=None, hooks=None, memo=None) -> WindowResult:
    result = model.upscale_window(x, Conditioning(prompt, seed, options, memo or RunMemo()), hooks or RunHooks())
    assert isinstance(result, WindowResult)
    return result


def image_and_report(*args, **kw) -> tuple[torch.Tensor, dict]:
    result = run(*args, **kw)
    return result.image, result.report


def low_res(seed: int = 0, size=(16, 16)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, *size, generator=gen) * 255).round() / 255  # 8-bit values, like a real crop


def pil_bicubic_4x(x: torch.Tensor) -> torch.Tensor:
    """The authors' SR input: the 8-bit RGB image resized with PIL BICUBIC, then ToTensor (/255)."""
    rgb = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGB")
    big = rgb.resize((x.shape[3] * 4, x.shape[2] * 4), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(big, np.float32) / 255).permute(2, 0, 1)[None]


def unmerged(files):
    comps = tiny_sd3.build_components(0)
    vae = copy.deepcopy(comps["vae"])
    encoder = tiny_sd3.peft_encoder(vae)
    encoder.load_state_dict({k: v.float() for k, v in torch.load(files["lora"]["vae"], weights_only=True).items()})
    vae.encoder = encoder
    transformer = copy.deepcopy(comps["transformer"])
    pairs = torch.load(files["lora"]["transformer"], weights_only=True)
    from diffusers.models.normalization import AdaLayerNormZero

    k = 0
    for block in transformer.transformer_blocks:
        for attr in ("norm1", "norm1_context"):
            norm = getattr(block, attr)
            if isinstance(norm, AdaLayerNormZero):
                up, down = pairs[2 * k], pairs[2 * k + 1]
                norm.linear.register_forward_hook(lambda m, inp, out, up=up, down=down: out + inp[0] @ down.T @ up.T)
                k += 1
    return comps, vae, transformer


@torch.no_grad()
def reference_step(files, x_lr: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
    comps, vae, transformer = unmerged(files)
    seq, _, pooled, _ = tiny_sd3.pipeline(comps).encode_prompt(
        prompt, prompt, prompt, device=CPU, do_classifier_free_guidance=False, max_sequence_length=512)
    x = pil_bicubic_4x(x_lr) * 2 - 1
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(seed)) * 1.5305
    v = transformer(hidden_states=z, timestep=torch.tensor([1000.0]), encoder_hidden_states=seq,
                    pooled_projections=pooled).sample
    return (vae.decode((z - v) / 1.5305 + 0.0609).sample.clamp(-1, 1) * 0.5 + 0.5)


# ------------------------------------------------------------------------------ layouts and parity
def test_lora_files_are_in_the_published_layouts(files, model):
    pairs = torch.load(files["lora"]["transformer"], weights_only=True)
    assert isinstance(pairs, list) and len(pairs) == 2 * (2 * tiny_sd3.LAYERS - 1)  # 24 layers: 94
    assert pairs[0].shape == (6 * tiny_sd3.WIDTH, 4) and pairs[1].shape == (4, tiny_sd3.WIDTH)
    enc = torch.load(files["lora"]["vae"], weights_only=True)
    assert len(enc) == 168 and sum(".lora_" in k for k in enc) == 62 and sum(".base_layer." in k for k in enc) == 62
    assert all(v.dtype == torch.float16 for v in enc.values())
    lora_files = [f for f in model.files if "LoRA" in f["part"]]
    assert [f["targets"] for f in lora_files if "targets" in f] == [3] and lora_files[1]["wrapped_modules"] == 31
    assert all(len(f["sha256"]) == 64 for f in lora_files)


def test_one_step_matches_the_unmerged_reference(files, model):
    x = low_res(1)
    ours = run(model, x).image
    ref = reference_step(files, x, PROMPT, SEED)
    assert ours.shape == ref.shape == (1, 3, 64, 64) and ref.std() > 0.02
    assert (ours - ref).abs().max() <= 1e-4


def test_the_sr_input_is_the_8bit_bicubic_of_the_whole_pass_input(model, monkeypatch):
    """PIL BICUBIC on the 8-bit RGB image (rounded, clipped: a hard edge does not overshoot), /255 - and
    for a tiled pass the bicubic of the whole input, so tiles are cut from it (a crop's bicubic differs at borders)."""
    edge = torch.zeros(1, 3, 12, 12)
    edge[..., 6:] = 1.0
    big = step.bicubic_8bit(edge, 4)
    assert big.shape == (1, 3, 48, 48) and big.min() == 0 and big.max() == 1
    assert torch.equal(big * 255, (big * 255).round())  # on the 8-bit grid
    assert torch.equal(big, pil_bicubic_4x(edge))
    seen = []
    real = step.sr_step
    monkeypatch.setattr(step, "sr_step", lambda comps, image, *a, **k: seen.append(image.clone()) or real(comps, image, *a, **k))
    x = low_res(9, (40, 28))
    result = run(model, x, options=CoZOptions(tile=8, overlap=2, sampling="mean"))
    assert result.report["transformer_tiles"]["count"] > 1 and result.report["sr_input"].startswith("8-bit")
    assert torch.equal(seen[0], pil_bicubic_4x(x))  # one bicubic of the whole pass input
    notes = result.report["notes"]
    assert any("tiles blended" in n or "latent tiles" in n for n in notes) and any("posterior mean" in n for n in notes)
    assert any("modulation to fp16" in n for n in notes) and any("text encoders run in fp32" in n for n in notes)


def test_merged_equals_unmerged_per_network(files, model):
    _, vae, transformer = unmerged(files)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        assert (model.comps.vae.encoder(x) - vae.encoder(x)).abs().max() <= 1e-5
        z = torch.randn(1, 16, 8, 8, generator=gen)
        seq, pooled = torch.randn(1, 20, tiny_sd3.JOINT, generator=gen), torch.randn(1, 80, generator=gen)
        kw = dict(timestep=torch.tensor([1000.0]), encoder_hidden_states=seq, pooled_projections=pooled)
        merged = model.comps.transformer(hidden_states=z, **kw).sample
        assert (merged - transformer(hidden_states=z, **kw).sample).abs().max() <= 1e-5
        base = tiny_sd3.build_components(0)["transformer"](hidden_states=z, **kw).sample
        assert (merged - base).abs().max() > 1e-3  # the LoRA changed something


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_embeddings_equal_diffusers_encode_prompt(files, model, with_t5):
    upscaler = model if with_t5 else load(files, use_t5=False)
    pipe = tiny_sd3.pipeline(tiny_sd3.build_components(0), with_t5=with_t5)
    for prompt in (PROMPT, ""):
        seq, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=CPU, do_classifier_free_guidance=False,
                                               max_sequence_length=512)
        ours_seq, ours_pooled, _ = upscaler.prompt_embeddings(prompt, CPU)
        assert ours_seq.shape == seq.shape == (1, 77 + 512, tiny_sd3.JOINT)
        assert (ours_seq - seq).abs().max() <= 1e-5 and (ours_pooled - pooled).abs().max() <= 1e-5  # fp32 kernel noise


def test_single_files_load_the_same_model(files, model):
    single = load(files, base=files["checkpoint"], text_files={r: files[r] for r in ("clip_l", "clip_g", "t5")})
    x = low_res(2)
    a, b = run(model, x).image, run(single, x).image
    assert (a - b).abs().max() <= 1e-5
    assert [f["part"] for f in single.files] == ["checkpoint", "clip_l", "clip_g", "t5", "transformer LoRA",
                                                 "VAE encoder LoRA"]
    assert single.source.sha256 == single.files[0]["sha256"]


def test_checkpoint_with_clips_inside_and_no_t5(files, model):
    inside = tiny_sd3.write_single_files(files["root"] / "incl", include_clips=True,
                                         name="sd3_medium_incl_clips.safetensors")
    no_t5 = load(files, base=inside["checkpoint"])  # no T5 in the file and none given: optional
    y, report = image_and_report(no_t5, low_res(2))
    assert NO_T5_NOTE in report["notes"] and report["networks"]["t5"] is None
    assert [f["part"] for f in no_t5.files][0] == "checkpoint" and len(no_t5.files) == 3
    with_t5 = run(model, low_res(2)).image
    assert (y - with_t5).abs().max() > 1e-4  # T5 matters


# ------------------------------------------------------------------------------ seeds and sampling
def test_same_seed_same_bits_and_the_posterior_mean(model):
    x = low_res(4)
    a, b = run(model, x, seed=11).image, run(model, x, seed=11).image
    c = run(model, x, seed=12).image
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4
    mean = CoZOptions(sampling="mean")
    m1 = run(model, x, seed=1, options=mean).image
    assert torch.equal(m1, run(model, x, seed=2, options=mean).image)
    memo = RunMemo()  # one run: the prompt is encoded once
    first, second = run(model, x, seed=None, memo=memo).report, run(model, x, seed=None, memo=memo).report
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
    assert (first["prompt_embedding"], second["prompt_embedding"]) == ("encoded", "reused")


def test_large_inputs_tile_the_latent_and_the_vae(model):
    x = low_res(5, (40, 28))  # -> 160x112: latent 20x14
    # 4 MiB free: a whole tiny-VAE pass over 20x14 latent px (~9 MB) does not fit, so the VAE runs in windows
    short = RunHooks(free_bytes=lambda device: 4 * 2**20)
    tiled, report = image_and_report(model, x, seed=3, options=CoZOptions(tile=8, overlap=2, vae_tile=2), hooks=short)
    assert tiled.shape == (1, 3, 160, 112) and torch.isfinite(tiled).all()
    assert report["transformer_tiles"]["grid"] == [3, 2] and report["vae_decode_tiles"]["count"] > 1
    assert report["vae_encode_tiles"]["count"] > 1
    # the encoder: downsampled statistics, and the receipt says so; the decoder: exact in one pass even in
    # windows of 2 latent px (each reads only the pixel or two its convolutions reach), parked where memory is not
    assert report["vae_encode_tiles"]["statistics"] == {"side": 16, "exact": False, "one_pass": False,
                                                        "attention": "windowed", "parked": None}
    decoded = report["vae_decode_tiles"]["statistics"]
    assert decoded.pop("parked_bytes") > 0
    assert decoded == {"side": 20, "exact": True, "one_pass": True, "attention": "whole", "parked": "disk"}
    whole = run(model, x, seed=3, options=CoZOptions(tile=0, vae_tile=0)).image
    assert (tiled - whole).abs().mean() < 0.1  # the same picture; blended tiles differ only near their borders
    # memory to spare: the VAE runs whole whatever vae_tile asks (windows would only add work), no statistics pass
    roomy, report = image_and_report(model, x, seed=3, options=CoZOptions(tile=0, vae_tile=2))
    assert torch.equal(roomy, whole)
    for stage in ("vae_encode_tiles", "vae_decode_tiles"):
        assert report[stage]["count"] == 1 and report[stage]["statistics"] is None
    # past the position grid (32 latent px for the tiny model) auto tiling is forced
    big, report = image_and_report(model, low_res(6, (68, 8)), seed=3)
    assert big.shape == (1, 3, 272, 32) and report["transformer_tiles"]["grid"][0] > 1


def test_shared_groupnorm_matches_torch_in_any_memory_format():
    """The statistics pass and the shared-statistics pass compute GroupNorm as torch does (one multiply-add)."""
    from dreamforge_upscale.tiling.vae_tiles import SharedGroupNorm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 13, 11) * 3 + 1
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            expected, seen = norm(xf), []
            shared = SharedGroupNorm([norm])
            stats = shared.record(lambda: seen.append(norm(xf)))
            again = shared.apply(stats, lambda: norm(xf))
        for y in (seen[0], again):
            assert (y - expected).abs().max() < 1e-5 and y.is_contiguous(memory_format=fmt)


def test_subsampled_vae_statistics_keep_the_latents_spread(model):
    """When memory is short the statistics pass sees a smaller latent: subsampled, its statistics stay near the
    whole latent's; averaged (area), a latent's variance shrinks and the decode goes far off."""
    from dreamforge_upscale.tiling.vae_tiles import SharedGroupNorm, _stats_latent

    vae = model.comps.vae
    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    z = torch.randn(1, 16, 32, 24, generator=torch.Generator().manual_seed(1))

    def run(latent):
        return vae.decode(latent, return_dict=False)[0]

    with torch.inference_mode():
        whole, shared = run(z), SharedGroupNorm(norms)

        def error(small):
            stats = shared.record(lambda: run(small))
            return (shared.apply(stats, lambda: run(z)) - whole).abs().mean().item()

        subsampled = error(_stats_latent(z, 24))
        averaged = error(torch.nn.functional.interpolate(z, size=(24, 18), mode="area"))
    assert subsampled < 0.25 * whole.abs().mean().item() and subsampled < 0.1 * averaged, (subsampled, averaged)


def test_the_pack_upscale_path_records_tiled_upscale_options(model):
    from dreamforge_upscale.upscalers.sdx4 import SDX4Options

    image = low_res(8, (18, 14)).permute(0, 2, 3, 1)
    out, receipt = upscale(model, image,
                           UpscaleRequest(scale=4, prompt=PROMPT, seed=5, options=SDX4Options(tile=16, overlap=8)))
    assert out.shape == (1, 72, 56, 3) and receipt.impl == "diffusion" and receipt.seed == 5
    backend = receipt.passes[0].backend
    assert backend["transformer_tiles"]["tile"][0] <= 8 and any("steps, guidance" in n for n in receipt.notes)
    assert backend["sr_input_size"] == [64, 80]  # 56x72 padded to multiples of 16


# ------------------------------------------------------------------------------ tiled overhead
def test_the_forced_transformer_plan_is_the_fewest_smallest_windows():
    """The benchmark's forced case (latent 128, tile 64, overlap 16, patch 2): two windows of <= 64 cannot cover
    128 px with a 16 px overlap, so 3 x 3; 54 is the smallest even window three of which cover it. Its geometric
    floor (pixels the transformer sees / latent pixels) is what no implementation of these tiles avoids."""
    plan = plan_tiles(128, 128, 64, 16, context=0, multiple=2)
    assert (plan.rows.count, plan.cols.count, plan.rows.window, plan.cols.window) == (3, 3, 54, 54)
    assert min(plan.rows.min_overlap, plan.cols.min_overlap) >= 16
    assert plan.window_area_ratio == pytest.approx(9 * 54**2 / 128**2)
    assert plan_tiles(128, 96, 0, 16).window_area_ratio == 1.0


def test_auto_transformer_tile_is_the_largest_window_that_fits():
    """Auto tiles go to the patch multiple, not the pack's 32 px step: 98 instead of 96 latent px here saves a
    row and a column of windows (4 instead of 9)."""
    per_px, patch, limit = 1000.0, 2, 384
    budget = 99**2 * per_px  # a 99 x 99 latent window fits
    tile = step.transformer_tile(180, 180, per_px, budget, patch, limit)
    ours = plan_tiles(180, 180, tile, 16, multiple=patch)
    stepped = plan_tiles(180, 180, choose_tile(180, 180, 1, per_px, int(budget), 0), 16, multiple=patch)
    assert tile == 98 and ours.count == 4 and stepped.count == 9
    assert ours.window_area_ratio < stepped.window_area_ratio
    # whole when it fits memory and the position grid; the grid caps a window even with memory to spare
    assert step.transformer_tile(180, 180, per_px, 180**2 * per_px, patch, limit) == 0
    assert step.transformer_tile(400, 100, per_px, 10**12, patch, limit) == limit


def test_windows_per_call_follow_the_memory_budget():
    assert step.tiles_per_call(9, window_bytes=100, budget=250, cap=8) == 2
    assert step.tiles_per_call(9, 100, 10**6, 8) == 8 and step.tiles_per_call(3, 100, 10**6, 8) == 3
    assert step.tiles_per_call(9, 100, 50, 8) == 1  # not even one fits: one per call, the OOM retries decide


class _BatchOOM(RuntimeError):
    pass


class _AtMost(torch.nn.Module):
    """The tiny transformer, out of memory above `most` windows per call (fault injection)."""

    def __init__(self, transformer, most: int):
        super().__init__()
        self.inner, self.most, self.batches = transformer, most, []
        self.config = transformer.config

    def forward(self, hidden_states, **kw):
        self.batches.append(hidden_states.shape[0])
        if hidden_states.shape[0] > self.most:
            raise _BatchOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(hidden_states=hidden_states, **kw)


def test_batched_transformer_windows_match_one_per_call(model):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 16, 40, 40, generator=gen)  # a batch of 2 images: windows stack as 2 x n
    seq, pooled = torch.randn(1, 30, tiny_sd3.JOINT, generator=gen), torch.randn(1, 80, generator=gen)
    opts = CoZOptions(tile=16, overlap=4)  # 3 x 3 windows of 16

    def predict(transformer, max_per_call, hooks=RunHooks()):
        with torch.inference_mode():
            return step.predict_v(transformer, z, seq, pooled, opts, CPU, torch.float32, hooks, max_per_call)

    one, report = predict(model.comps.transformer, None)  # the CPU policy: one window per call
    assert report["transformer_tiles"]["tiles_per_call"] == 1 and report["transformer_tiles"]["count"] == 9
    # out of memory with 8 windows per call: 4 per call for the rest of the plan, the same v
    limited = _AtMost(model.comps.transformer, most=2 * 4)
    batched, report = predict(limited, 8, RunHooks(oom_errors=(_BatchOOM,)))
    assert limited.batches == [16, 8, 8, 2] and (batched - one).abs().max() <= 1e-5
    assert [(r["stage"], r["tiles_per_call"], r["retry_tiles_per_call"]) for r in report["retries"]] == [
        ("tile batch", 8, 4)]
    # memory for three windows (latent px + prompt tokens of a 2-image batch): three per call
    window = 2 * step.transformer_bytes_per_latent_px(model.comps.transformer, torch.float32) * (16 * 16 + 30 * 4)
    roomy = RunHooks(free_bytes=lambda device: int(3.5 * window / BUDGET_FRACTION))
    three, report = predict(model.comps.transformer, 8, roomy)
    assert report["transformer_tiles"]["tiles_per_call"] == 3 and (three - one).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ safety and errors
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['COZ_MARKER']}",))


def merge_into_copy(model, transformer_lora=None, vae_lora=None) -> None:
    """The loader's LoRA step on copies of the loaded networks (the base load itself is tested above)."""
    if transformer_lora:
        merge_transformer_lora(copy.deepcopy(model.comps.transformer), transformer_lora)
    if vae_lora:
        merge_vae_encoder_lora(copy.deepcopy(model.comps.vae), vae_lora)


@pytest.mark.parametrize("which", ["transformer_lora", "vae_lora"])
def test_a_lora_with_pickled_code_is_refused_and_never_runs(model, tmp_path, monkeypatch, which):
    marker = tmp_path / "ran"
    monkeypatch.setenv("COZ_MARKER", str(marker))
    evil = tmp_path / "evil.pkl"
    torch.save([_Evil()], evil)
    with pytest.raises(UpscalerError, match="refused: it is not a plain weights file"):
        merge_into_copy(model, **{which: evil})
    assert not marker.exists()


def test_transformer_lora_mismatches_name_count_and_tensor(files, model, tmp_path):
    pairs = torch.load(files["lora"]["transformer"], weights_only=True)
    short, bad = tmp_path / "short.pkl", tmp_path / "bad.pkl"
    torch.save(pairs[:4], short)
    torch.save(pairs[:3] + [torch.zeros(4, tiny_sd3.WIDTH + 1)] + pairs[4:], bad)
    with pytest.raises(UpscalerError, match=r"expected 6 tensors \(3 up/down pairs .* 2-layer SD3 transformer\); got 4"):
        merge_into_copy(model, transformer_lora=short)
    with pytest.raises(UpscalerError, match=r"tensor 3 \(transformer_blocks.0.norm1_context.linear down\) has shape "
                                            r"\(4, 129\), expected \(4, 128\)"):
        merge_into_copy(model, transformer_lora=bad)
    as_dict = tmp_path / "dict.pkl"
    torch.save({"a": pairs[0]}, as_dict)
    with pytest.raises(UpscalerError, match="expected the transformer LoRA as a list"):
        merge_into_copy(model, transformer_lora=as_dict)


def test_vae_lora_mismatches_name_the_key(files, model, tmp_path):
    sd = torch.load(files["lora"]["vae"], weights_only=True)
    cases = {
        "missing_base": ({k: v for k, v in sd.items() if k != "conv_out.base_layer.weight"}, "lacks 1 base tensors, e.g. conv_out.weight"),
        "missing_b": ({k: v for k, v in sd.items() if k != "conv_in.lora_B.default_encoder.weight"}, "conv_in.lora_B is missing"),
        "bad_shape": ({**sd, "conv_in.lora_A.default_encoder.weight": torch.zeros(4, 3, 1, 1)}, r"conv_in lora_A \(4, 3, 1, 1\)"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(UpscalerError, match=message):
            merge_into_copy(model, vae_lora=path)


def test_base_model_errors(files, model, tmp_path):
    with pytest.raises(UpscalerError, match="not a Stable Diffusion 3 checkpoint"):
        load(files, base=files["clip_g"])
    with pytest.raises(UpscalerError, match="has no CLIP-L text encoder: put clip_l.safetensors"):
        load(files, base=files["checkpoint"], text_files={"clip_g": files["clip_g"]})
    with pytest.raises(UpscalerError, match="SD3 base model not found"):
        load(files, base=tmp_path / "nothing.safetensors")
    with pytest.raises(UpscalerError, match="file not found"):
        merge_into_copy(model, vae_lora=tmp_path / "vae_encoder_20001.pt")
    with pytest.raises(UpscalerError, match="dtype fp16 is not supported on the CPU"):
        select_dtypes("fp16", CPU)
    with pytest.raises(UpscalerError, match="sampling must be one of sample, mean"):
        CoZOptions(sampling="mode").check()


def test_a_latent_wider_than_the_receptive_field_decodes_exactly_in_windows(reference, tmp_path, monkeypatch):
    """Chain-of-Zoom's SD3 VAE through the layered one pass (tiling/exact_decode.py): windows planned from a
    budget too small for the whole decode, parked in files, equal to the untiled decode."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    vae = reference["vae"] if isinstance(reference, dict) else reference.vae
    torch.manual_seed(4)
    z = torch.randn(1, vae.config.latent_channels, 72, 56)
    short = RunHooks(free_bytes=lambda device: 190 * 2**20)  # the whole decode needs 126 MiB of the 114 budgeted
    with torch.inference_mode():
        whole, plain = step.decode(vae, z, CoZOptions(), CPU, torch.float32, RunHooks())
        tiled, report = step.decode(vae, z, CoZOptions(), CPU, torch.float32, short)
    assert plain["vae_decode_tiles"]["count"] == 1
    assert report["vae_decode_tiles"]["statistics"].pop("parked_bytes") > 0
    assert report["vae_decode_tiles"]["count"] > 1 and report["vae_decode_tiles"]["statistics"] == {
        "side": 72, "exact": True, "one_pass": True, "attention": "whole", "parked": "disk"}
    assert (tiled - whole).abs().max().item() <= 1e-4 and not os.listdir(tmp_path)
