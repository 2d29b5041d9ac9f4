"""Tiny random Stable Diffusion 3 components and Chain-of-Zoom LoRA files, written in the layouts users have.

The architecture is SD3 medium's (MMDiT with 64-wide heads, a 16-channel 4-level VAE with scaling
1.5305 / shift 0.0609 and no quant convs, CLIP-L + CLIP-G with projection, T5 v1.1) at small widths.
Writers: a diffusers folder; the single files (an sd3_medium-style checkpoint through ComfyUI's own
MMDiT / VAE key maps, and clip_l / clip_g / t5xxl files); the two LoRA files in the published layouts
(a list of [up, down] tensors; the encoder's state dict as peft names it, made by peft itself).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LAYERS = 2  # ComfyUI's MMDiT map assumes width = 64 x depth, as in SD3 medium (24 x 64 = 1536)
WIDTH = 64 * LAYERS
CLIP_L, CLIP_G, JOINT = 32, 48, 96  # CLIP-L | CLIP-G features are zero-padded to the T5 / joint width
POS_MAX = 16  # position grid: one transformer call covers at most 32 latent px (256 image px)
VAE_CHANNELS = (8, 16, 32, 32)
RANK = 4
ENCODER_LORA_MODULES = (
    ["conv_in", "conv_out"]
    + [f"down_blocks.{b}.resnets.{r}.conv{c}" for b in range(4) for r in range(2) for c in (1, 2)]
    + [f"down_blocks.{b}.resnets.0.conv_shortcut" for b in (1, 2)]
    + [f"down_blocks.{b}.downsamplers.0.conv" for b in range(3)]
    + [f"mid_block.resnets.{r}.conv{c}" for r in range(2) for c in (1, 2)]
    + [f"mid_block.attentions.0.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
)
ADAPTER = "default_encoder"


def _comfyui() -> Path:
    from comfy_headless import comfyui_dir  # scripts/ (on sys.path via conftest)

    return comfyui_dir()


def clip_tokenizer_dir() -> Path:
    return _comfyui() / "comfy" / "sd1_tokenizer"


def t5_tokenizer_dir() -> Path:
    return _comfyui() / "comfy" / "text_encoders" / "t5_tokenizer"


def _signal(*modules: torch.nn.Module) -> None:
    """Random init leaves zero-initialised layers in diffusers: give every tensor some signal."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
            module.eval()


def build_components(seed: int = 0, pos_max: int = POS_MAX) -> dict:
    """`pos_max`: the position grid (one transformer call covers 2 x pos_max latent px); the benchmark widens it."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=LAYERS, attention_head_dim=64,
        num_attention_heads=WIDTH // 64, joint_attention_dim=JOINT, caption_projection_dim=WIDTH,
        pooled_projection_dim=CLIP_L + CLIP_G, out_channels=16, pos_embed_max_size=pos_max)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=list(VAE_CHANNELS), layers_per_block=2,
        latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False)

    def clip(width: int, act: str):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=77, hidden_act=act, projection_dim=width,
            bos_token_id=0, eos_token_id=2, pad_token_id=1))

    clip_l, clip_g = clip(CLIP_L, "quick_gelu"), clip(CLIP_G, "gelu")
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=JOINT, num_heads=2, d_kv=JOINT // 2, d_ff=128,
                                 num_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                 is_encoder_decoder=False, use_cache=False))
    _signal(transformer, vae, clip_l, clip_g, t5)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(CLIP_L))  # SD3's CLIP-L single file has none: identity
    return {"transformer": transformer, "vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5": t5}


def tokenizers() -> dict:
    from transformers import CLIPTokenizer, T5TokenizerFast

    d = clip_tokenizer_dir()
    return {
        "tokenizer": CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>",
                                   model_max_length=77),
        "tokenizer_2": CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="!",
                                     model_max_length=77),
        "tokenizer_3": T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir()), local_files_only=True),
    }


def pipeline(comps: dict, with_t5: bool = True):
    """diffusers' own StableDiffusion3Pipeline over the tiny components (the prompt-encoding reference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = tokenizers()
    return StableDiffusion3Pipeline(
        transformer=comps["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=comps["vae"],
        text_encoder=comps["clip_l"], tokenizer=tok["tokenizer"], text_encoder_2=comps["clip_g"],
        tokenizer_2=tok["tokenizer_2"], text_encoder_3=comps["t5"] if with_t5 else None,
        tokenizer_3=tok["tokenizer_3"] if with_t5 else None)


def write_diffusers_folder(root: Path, seed: int = 0, pos_max: int = POS_MAX) -> Path:
    pipeline(build_components(seed, pos_max)).save_pretrained(root, safe_serialization=True)
    return root


# ------------------------------------------------------------------------------- single files
def _import_comfy() -> None:
    root = str(_comfyui())
    if root not in sys.path:
        sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def mmdit_state_dict(transformer: torch.nn.Module, prefix: str = "model.diffusion_model.", depth: int = LAYERS) -> dict:
    """diffusers SD3 transformer -> the original MMDiT keys, through ComfyUI's key map (independent of diffusers').
    `depth`: the transformer's layers (SD3 medium: 24; benchmarks/real_size.py passes it)."""
    _import_comfy()
    import comfy.utils

    own = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    for key, target in comfy.utils.mmdit_to_diffusers({"depth": depth}, prefix).items():
        if key not in own:
            continue
        if isinstance(target, str):
            out[target] = own[key]
        elif target[1] is None:  # (key, None, swap_scale_shift): the swap is its own inverse
            out[target[0]] = target[2](own[key])
        else:  # (qkv key, (dim, offset, size))
            qkv.setdefault(target[0], {})[target[1][1]] = own[key]
    for key, parts in qkv.items():
        out[key] = torch.cat([parts[o] for o in sorted(parts)], dim=0)
    mapped = sum(1 for k in own if k in comfy.utils.mmdit_to_diffusers({"depth": depth}, prefix))
    assert mapped == len(own), f"ComfyUI's map misses {len(own) - mapped} transformer tensors"
    return out


def vae_state_dict(vae: torch.nn.Module, prefix: str = "first_stage_model.") -> dict:
    _import_comfy()
    import comfy.diffusers_convert as dc

    return {prefix + k: v for k, v in dc.convert_vae_state_dict(vae.state_dict()).items()}


def text_state_dict(model: torch.nn.Module, role: str) -> dict:
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if role == "clip_l":
        sd.pop("text_projection.weight")  # as in SD3's clip_l.safetensors
    if role == "t5":
        sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    return sd


def write_single_files(folder: Path, seed: int = 0, include_clips: bool = False, name: str = "sd3_medium.safetensors"
                       ) -> dict[str, Path]:
    """The checkpoint (MMDiT + VAE [+ CLIP-L/G]) and clip_l / clip_g / t5xxl_fp16 files; same weights as the folder."""
    from safetensors.torch import save_file

    comps = build_components(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {**mmdit_state_dict(comps["transformer"]), **vae_state_dict(comps["vae"])}
    if include_clips:
        for role in ("clip_l", "clip_g"):
            sd.update({f"text_encoders.{role}.transformer." + k: v for k, v in text_state_dict(comps[role], role).items()})
    paths = {"checkpoint": folder / name}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["checkpoint"]))
    for role, file in (("clip_l", "clip_l.safetensors"), ("clip_g", "clip_g.safetensors"), ("t5", "t5xxl_fp16.safetensors")):
        paths[role] = folder / file
        save_file({k: v.contiguous() for k, v in text_state_dict(comps[role], role).items()}, str(paths[role]))
    return paths


# ------------------------------------------------------------------------------- LoRA files
def transformer_lora_tensors(transformer: torch.nn.Module, seed: int = 1) -> list[torch.Tensor]:
    """[up, down] per AdaLayerNormZero linear in module order (block0.norm1, block0.norm1_context, ...)."""
    from diffusers.models.normalization import AdaLayerNormZero

    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for block in transformer.transformer_blocks:
        for attr in ("norm1", "norm1_context"):
            norm = getattr(block, attr)
            if isinstance(norm, AdaLayerNormZero):
                tensors.append(torch.randn(norm.linear.out_features, RANK, generator=gen) * 0.05)
                tensors.append(torch.randn(RANK, norm.linear.in_features, generator=gen) * 0.05)
    return tensors


def peft_encoder(vae: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """The VAE's encoder wrapped by peft as the authors did (r 4, alpha 8), with non-zero B."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    encoder = copy.deepcopy(vae.encoder)
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights="gaussian", target_modules=ENCODER_LORA_MODULES)
    encoder = inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return encoder.eval()


def write_lora_files(folder: Path, seed: int = 0, comps: dict | None = None) -> dict[str, Path]:
    """model_20001.pkl (torch.save of a list) and vae_encoder_20001.pt (the peft-named encoder state dict, fp16).
    `comps`: the transformer and VAE to shape them for (default: build_components(seed); benchmarks/real_size.py
    passes SD3 medium's, the transformer on the meta device)."""
    comps = comps or build_components(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"transformer": folder / "model_20001.pkl", "vae": folder / "vae_encoder_20001.pt"}
    torch.save(transformer_lora_tensors(comps["transformer"]), paths["transformer"])
    # fp16, like the published file; the base tensors are this seed's encoder (the file carries its own base)
    torch.save({k: v.half() for k, v in peft_encoder(comps["vae"]).state_dict().items()}, paths["vae"])
    return paths


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


# ------------------------------------------------------------------------------- every user layout
# What a ComfyUI user may have for SD3 medium, in each file's own key layout and dtype (see docs/coz_model.md,
# "File layouts"): the published single files are fp16 (MMDiT, VAE, CLIP-L/G, t5xxl_fp16), the T5 of
# sd3_medium_incl_clips_t5xxlfp8 is float8_e4m3fn throughout (layer norms too), t5xxl_fp8_e4m3fn stores its
# Linear weights (and the token embedding) in float8_e4m3fn, and t5xxl_fp8_e4m3fn_scaled is ComfyUI's
# scaled fp8: a `scaled_fp8` marker tensor and per Linear an fp32 `<layer>.scale_weight` (some with a
# `scale_input`), dequantised as weight.to(fp32) * scale_weight (comfy/ops.py).
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CHECKPOINTS = ("sd3_medium.safetensors", "sd3_medium_incl_clips.safetensors",
               "sd3_medium_incl_clips_t5xxlfp16.safetensors", "sd3_medium_incl_clips_t5xxlfp8.safetensors")
T5_FILES = ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors")
T5_PREFIX = "text_encoders.t5xxl.transformer."


def layout_components(seed: int = 0) -> dict:
    """build_components(seed) with every weight rounded to fp16 (kept in fp32): the values the published fp16
    files hold, so a diffusers folder of these and the fp16 single files describe the same network."""
    comps = build_components(seed)
    with torch.no_grad():
        for module in comps.values():
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point():
                    t.copy_(t.half().float())
    return comps


def t5_linears(t5: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}


def t5_file_tensors(t5: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """T5's tensors as the named layout stores them: fp16, fp8 (Linear + token embedding; norms and the
    relative position bias fp16), fp8_all (every tensor, as inside the incl_clips_t5xxlfp8 checkpoint) or
    fp8_scaled (ComfyUI's scaled fp8)."""
    sd = text_state_dict(t5, "t5")
    linears = t5_linears(t5)
    if layout == "fp16":
        return {k: v.half() for k, v in sd.items()}
    if layout == "fp8_all":
        return {k: v.to(FP8) for k, v in sd.items()}
    if layout == "fp8":
        return {k: v.to(FP8) if k in linears or k == "shared.weight" else v.half() for k, v in sd.items()}
    if layout == "fp8_scaled":
        out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8)}  # ComfyUI's marker
        for k, v in sd.items():
            if k in linears:
                layer = k[: -len(".weight")]
                scale = (v.abs().max().float() / FP8_MAX).reshape(())
                out[k] = (v.float() / scale).to(FP8)
                out[f"{layer}.scale_weight"] = scale
                if ".block.0." in k:  # present in some files; ComfyUI's text encoders do not use it
                    out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            else:
                out[k] = v.half()
        return out
    raise ValueError(layout)


def dequantised(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A written T5 file's tensors in fp32 as ComfyUI's ops read them: weight.to(fp32) * scale_weight for a
    layer with a scale (scaled fp8), a plain upcast otherwise; markers dropped."""
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = sd.get(k[: -len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        out[k] = v.to(torch.float32) * scale.to(torch.float32) if scale is not None else v.to(torch.float32)
    return out


def t5_from(t5: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `t5` holding the fp32 tensors of `sd` (strict: every tensor)."""
    import copy

    ref = copy.deepcopy(t5)
    ref.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, strict=True)
    return ref.eval()


def _save(sd: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_layouts(root: Path, seed: int = 0) -> dict:
    """Every layout of the same (fp16-valued) tiny SD3: `folder` (diffusers, fp32), the four checkpoints by file
    name, clip_l / clip_g / the three t5xxl files by file name, and `t5_reference` {file name: the fp32 T5 that
    file's weights dequantise to} (the folder's own T5 for the fp16 files)."""
    comps = layout_components(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"folder": root / "stable-diffusion-3-medium-diffusers", "root": root}
    pipeline(comps).save_pretrained(out["folder"], safe_serialization=True)
    base = {k: v.half() for k, v in {**mmdit_state_dict(comps["transformer"]), **vae_state_dict(comps["vae"])}.items()}
    clips = {f"text_encoders.{r}.transformer." + k: v.half() for r in ("clip_l", "clip_g")
             for k, v in text_state_dict(comps[r], r).items()}
    t5_layouts = {"t5xxl_fp16.safetensors": "fp16", "t5xxl_fp8_e4m3fn.safetensors": "fp8",
                  "t5xxl_fp8_e4m3fn_scaled.safetensors": "fp8_scaled"}
    t5_sd = {file: t5_file_tensors(comps["t5"], layout) for file, layout in t5_layouts.items()}
    t5_all8 = t5_file_tensors(comps["t5"], "fp8_all")
    inside = {
        "sd3_medium.safetensors": {},
        "sd3_medium_incl_clips.safetensors": clips,
        "sd3_medium_incl_clips_t5xxlfp16.safetensors": {**clips, **{T5_PREFIX + k: v for k, v in
                                                                   t5_sd["t5xxl_fp16.safetensors"].items()}},
        "sd3_medium_incl_clips_t5xxlfp8.safetensors": {**clips, **{T5_PREFIX + k: v for k, v in t5_all8.items()}},
    }
    for file, extra in inside.items():
        out[file] = _save({**base, **extra}, root / "checkpoints" / file)
    for role in ("clip_l", "clip_g"):
        out[f"{role}.safetensors"] = _save({k: v.half() for k, v in text_state_dict(comps[role], role).items()},
                                           root / "text_encoders" / f"{role}.safetensors")
    for file, sd in t5_sd.items():
        out[file] = _save(sd, root / "text_encoders" / file)
    out["t5_reference"] = {file: t5_from(comps["t5"], dequantised(sd)) for file, sd in t5_sd.items()}
    out["t5_reference"]["sd3_medium_incl_clips_t5xxlfp8.safetensors"] = t5_from(comps["t5"], dequantised(t5_all8))
    out["t5_reference"]["sd3_medium_incl_clips_t5xxlfp16.safetensors"] = out["t5_reference"]["t5xxl_fp16.safetensors"]
    return out


def write_t5_file(path: Path, d_model: int, layers: int, d_ff: int, vocab: int = 32128, heads: int = 8,
                  seed: int = 0) -> int:
    """A random T5 v1.1 encoder of the given size in t5xxl_fp16.safetensors' layout (for memory tests); returns
    its parameter count. Built on the meta device and filled tensor by tensor, so writing it stays small too."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=d_model // heads,
                                     d_ff=d_ff, num_layers=layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     is_encoder_decoder=False, use_cache=False))
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in t5.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        sd[k] = (torch.randn(v.shape, generator=gen) * 0.05).half() if "layer_norm" not in k else torch.ones(
            v.shape, dtype=torch.float16)
    _save(sd, path)
    return sum(v.numel() for v in sd.values())
