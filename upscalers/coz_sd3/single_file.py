"""SD3 medium from the single files users have in ComfyUI, offline.

sd3_medium*.safetensors (MMDiT + VAE, optionally CLIP-L/G and T5 under text_encoders.*), plus
clip_l / clip_g / t5xxl_* files (models/text_encoders or models/clip) for what the checkpoint lacks.
Configs are sized from the weights (configs.py); the transformer's key mapping is diffusers' own
single-file converter, the VAE's diffusers' LDM converter.

Loading never makes a random init or a second copy: each network is built on the meta device, every
tensor is read from the file on its own (plain reads, loading.SafetensorsFile), converted once to the
network's compute dtype and assigned (load_state_dict(assign=True)). fp8 tensors are dequantised per tensor:
in ComfyUI's `scaled_fp8` layout (t5xxl_fp8_e4m3fn_scaled.safetensors) a Linear weight is
weight.to(fp32) * <layer>.scale_weight, then the compute dtype (comfy/ops.py scaled_fp8_op.convert_weight);
other fp8 tensors are a plain cast, as ComfyUI's manual_cast does. A file in a layout the pack does not know
(GGUF, other quantisations, integer or unknown dtypes, another model's keys, truncated) is refused by name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ...assets.hashing import sha256_of
from ...runtime.errors import UpscalerError, error_text
from ..loading import SafetensorsFile, read_weights
from . import configs
from .components import CoZComponents, TokenizerDirs, clip_tokenizer, t5_tokenizer

TEXT_ROLES = ("clip_l", "clip_g", "t5")
ROLE_LABEL = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}
ROLE_FIX = {
    "clip_l": "clip_l.safetensors (SD3 medium's text_encoders/clip_l.safetensors)",
    "clip_g": "clip_g.safetensors (SD3 medium's text_encoders/clip_g.safetensors)",
    "t5": "t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors",
}
CHECKPOINT_FIX = ("sd3_medium.safetensors (or sd3_medium_incl_clips*.safetensors) from stabilityai/"
                  "stable-diffusion-3-medium in models/checkpoints")
# dtypes the pack converts to a compute dtype (fp8: a plain cast, or dequantised with ComfyUI's scale_weight)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALED_FP8 = "scaled_fp8"  # ComfyUI's marker tensor of its scaled fp8 layout (dtype: the weights' fp8 type)
# the per-layer tensors of quantised formats, with the format's name (for the refusal)
QUANT_TENSORS = {
    "scale_weight": "ComfyUI's scaled fp8 (read for T5-XXL only)", "scale_input": "ComfyUI's scaled fp8",
    "weight_scale": "fp8 with weight_scale (ComfyUI mixed precision / diffusers / compressed-tensors)",
    "weight_scale_2": "ComfyUI mixed precision (nvfp4)", "input_scale": "fp8 with input_scale",
    "comfy_quant": "ComfyUI mixed precision", "absmax": "bitsandbytes 4-bit", "quant_map": "bitsandbytes 4-bit",
    "nested_absmax": "bitsandbytes 4-bit", "nested_quant_map": "bitsandbytes 4-bit", "SCB": "bitsandbytes 8-bit",
    "weight_format": "bitsandbytes 8-bit", "qweight": "GPTQ/AWQ", "qzeros": "GPTQ/AWQ", "scales": "GPTQ/AWQ",
    "g_idx": "GPTQ", "weight_packed": "compressed-tensors", "weight_shape": "compressed-tensors",
}
FP32 = (torch.float32, torch.float32, torch.float32)


# ------------------------------------------------------------------------------- reading
class _Loaded:
    """A state dict already in memory (a .pt/.bin text encoder) behind SafetensorsFile's interface."""

    metadata: dict = {}

    def __init__(self, sd: dict, name: str):
        self.sd, self.name = sd, name

    def keys(self):
        return self.sd.keys()

    def __contains__(self, key) -> bool:
        return key in self.sd

    def dtype_name(self, key: str) -> str:
        t = self.sd[key]
        if not isinstance(t, torch.Tensor):
            return type(t).__name__
        names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                 torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
        return names.get(t.dtype, str(t.dtype).replace("torch.", ""))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def meta(self, key: str) -> torch.Tensor:
        t = self.sd[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def read(self, key: str, dtype: torch.dtype | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        t = self.sd[key]
        if scale is not None:  # ComfyUI's convert_weight: weight.to(fp32) * scale_weight, then the dtype
            return (t.to(torch.float32) * scale.to(torch.float32)).to(dtype or t.dtype)
        return t.to(dtype or t.dtype)


def open_weights(path: str | os.PathLike, fix: str):
    """A weights file for reading tensor by tensor, or a refusal naming the file, what is wrong and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"model file not found: {path}. Put {fix} there (text encoders: models/text_encoders "
                            "or models/clip; checkpoints: models/checkpoints)")
    if path.stat().st_size == 0:
        raise UpscalerError(f"{path.name} is empty (0 bytes): a download or copy did not finish. Re-download it")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if path.suffix.lower() == ".gguf" or magic == b"GGUF":
        raise UpscalerError(f"{path.name} is a GGUF file (quantised for the ComfyUI-GGUF nodes); this pack does not "
                            f"load GGUF: use {fix}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        return SafetensorsFile(path)
    return _Loaded(read_weights(path), path.name)  # .pt / .bin / .ckpt: weights only, in memory


class Tensors:
    """One network's tensors: a whole file, or the part of a checkpoint under `prefix` (keys without it)."""

    def __init__(self, source, prefix: str, name: str, fix: str):
        self.source, self.prefix, self.name, self.fix = source, prefix, name, fix
        self.keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
        self._set = set(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._set

    def full(self, key: str) -> str:
        return self.prefix + key

    def dtype_name(self, key: str) -> str:
        return self.source.dtype_name(self.full(key))

    def meta(self, keys=None) -> dict[str, torch.Tensor]:
        return {k: self.source.meta(self.full(k)) for k in (self.keys if keys is None else keys)}

    def read(self, key: str, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in `dtype`, converted once; with `scale`, dequantised as ComfyUI's convert_weight does."""
        return self.source.read(self.full(key), dtype, scale)

    def refuse(self, what: str) -> UpscalerError:
        return UpscalerError(f"{self.name}: {what}; use {self.fix}")

    def check_dtypes(self, keys) -> None:
        for k in keys:
            dt = self.dtype_name(k)
            if dt not in FLOAT_DTYPES:
                raise self.refuse(f"tensor {self.full(k)} is stored as {dt}, a quantised or unknown type this pack "
                                  "does not load (it reads fp32, fp16, bf16 and fp8 e4m3fn / e5m2)")

    def check_no_quantisation(self, expected, allowed=()) -> None:
        """Tensors of a quantised format (or extra per-layer tensors beside expected weights) are refused."""
        meta = getattr(self.source, "metadata", {}) or {}
        if "_quantization_metadata" in meta:
            raise self.refuse("it is quantised in ComfyUI's mixed-precision format (_quantization_metadata), "
                              "which this pack does not load")
        expected, allowed = set(expected), set(allowed)
        for k in self.keys:
            if k in expected or k in allowed:
                continue
            layer, _, leaf = k.rpartition(".")
            if k == SCALED_FP8 or leaf == SCALED_FP8:
                raise self.refuse(f"{self.full(k)} marks ComfyUI's scaled fp8 layout, which the pack reads for "
                                  "T5-XXL only")
            label = QUANT_TENSORS.get(leaf) or ("bitsandbytes 4-bit" if "quant_state" in k else None)
            if label is None and f"{layer}.weight" in expected and leaf not in ("weight", "bias"):
                label = "an unknown quantised layout (an extra tensor beside a layer's weight)"
            if label is not None:
                raise self.refuse(f"tensor {self.full(k)} belongs to {label}, a format this pack does not load")


def _what(keys) -> str:
    """What a file holds, from its keys (for refusals of a file chosen for the wrong part)."""
    keys = set(keys)
    if configs.SD3_KEY in keys:
        return "an SD3 checkpoint"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a diffusion-model checkpoint (not SD3 medium)"
    if any(k.startswith("text_model.encoder.layers.") for k in keys):
        return "a CLIP text encoder"
    if any(k.startswith("transformer.resblocks.") for k in keys):
        return "a CLIP text encoder in open_clip's layout"
    if any(k.startswith("encoder.block.") for k in keys):
        return "a T5 encoder"
    if any(k.startswith("model.layers.") for k in keys):
        return "a language model (Llama/Qwen/Gemma-style)"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
        return "a VAE"
    if any(k.startswith("joint_blocks.") for k in keys):
        return "an MMDiT without the model.diffusion_model. prefix (not ComfyUI's checkpoint layout)"
    return f"not a model this pack knows (first tensor: {next(iter(sorted(keys)), 'none')})"


def is_sd3_checkpoint(path: str | os.PathLike) -> bool:
    """Header check: an SD3 MMDiT (adaLN modulation of 9216 = 6 x 1536 on the published model). A truncated file
    with an SD3 header is listed too, so that loading it names the problem."""
    if Path(path).suffix.lower() != ".safetensors":
        return False
    try:
        return configs.SD3_KEY in SafetensorsFile(path).keys()
    except (OSError, UpscalerError) as exc:
        return "truncated" in str(exc) and _header_names_sd3(path)


def _header_names_sd3(path) -> bool:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            return 0 < n < (100 << 20) and configs.SD3_KEY.encode() in fh.read(n)
    except OSError:
        return False


# ------------------------------------------------------------------------------- assigning
def check_exact(own: dict, available: dict, what: str, name: str, optional: tuple[str, ...] = ()) -> None:
    """Every tensor of a module (`own`, its state dict) in `available` with its shape, or an error naming the first
    missing / misshapen one. Shapes only: `available` may hold meta tensors."""
    missing = sorted(k for k in own if available.get(k) is None and k not in optional)
    if missing:
        raise UpscalerError(f"{name}: the {what} weights are incomplete ({len(missing)} tensors missing, e.g. "
                            f"{missing[0]}); the file is damaged or not SD3 medium: re-download it")
    bad = [k for k in own if available.get(k) is not None and tuple(available[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UpscalerError(f"{name}: {what} tensor {bad[0]} has shape {tuple(available[bad[0]].shape)}, expected "
                            f"{tuple(own[bad[0]].shape)}")


def load_exact(module: torch.nn.Module, sd: dict, what: str, name: str, optional: tuple[str, ...] = ()) -> None:
    """Every tensor of `module` from `sd` (real tensors, already in their dtype), assigned without a copy."""
    own = module.state_dict()
    check_exact(own, sd, what, name, optional)
    module.load_state_dict({k: sd[k] for k in own if sd.get(k) is not None}, strict=False, assign=True)


def _finish(module: torch.nn.Module, what: str) -> torch.nn.Module:
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a tensor the file does not carry and no code below recreates: a bug of this loader, not the file
        raise RuntimeError(f"the {what} loader left {len(left)} tensors unset, e.g. {left[0]}")
    return module.eval().requires_grad_(False)


def keep_fp32(model: torch.nn.Module, dtype: torch.dtype):
    """key -> dtype as transformers' from_pretrained plans it: modules in _keep_in_fp32_modules stay fp32 when the
    model is fp16 (T5's `wo`, which overflows in fp16), those in _keep_in_fp32_modules_strict for fp16 and bf16.
    A single file then loads like the diffusers folder's text_encoder_3."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())

    def plan(key: str) -> torch.dtype:
        return torch.float32 if keep and set(key.split(".")) & keep else dtype
    return plan


def _build(factory):
    with torch.device("meta"):  # no random init: every tensor comes from the file
        return factory()


# ------------------------------------------------------------------------------- text encoders
def _tensors(sd, name: str | None, role: str) -> Tensors:
    if isinstance(sd, Tensors):
        return sd
    if isinstance(sd, (str, os.PathLike)):
        return Tensors(open_weights(sd, ROLE_FIX[role]), "", Path(sd).name, ROLE_FIX[role])
    return Tensors(_Loaded(sd, name or role), "", name or role, ROLE_FIX[role])


def _check_role(tensors: Tensors, role: str) -> None:
    family = _what(tensors.keys)
    wanted = "a T5 encoder" if role == "t5" else "a CLIP text encoder"
    if family != wanted:
        raise UpscalerError(f"{tensors.name} was chosen as the {ROLE_LABEL[role]} text encoder but it is {family}; "
                            f"choose {ROLE_FIX[role]} (models/text_encoders or models/clip)")


def build_clip(sd, role: str, name: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """CLIP-L / CLIP-G from transformers-layout keys (a file path, a state dict or Tensors), in `dtype`.

    CLIP-L's pooled output is unprojected in SD3 (diffusers' single-file loader uses the identity, ComfyUI's
    SD3 encoder return_projected_pooled=False), whatever projection the file carries. `text_projection` (the
    transposed layout of ComfyUI's CLIPSave) is read as ComfyUI does."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tensors = _tensors(sd, name, role)
    name = tensors.name
    if "transformer.resblocks.0.ln_1.weight" in tensors:
        raise tensors.refuse(f"the {ROLE_LABEL[role]} weights are in open_clip's layout (transformer.resblocks.*), "
                             "which this pack does not convert")
    _check_role(tensors, role)
    meta = tensors.meta()
    sources = {k: k for k in meta}
    transposed = "text_projection" in meta and "text_projection.weight" not in meta
    if transposed:
        meta["text_projection.weight"] = meta["text_projection"].T
        sources["text_projection.weight"] = "text_projection"
    if role == "clip_g" and "text_projection.weight" not in meta:
        raise tensors.refuse("it has no text_projection, which CLIP-G has: it looks like a CLIP-L file (SD3's "
                             "clip_l.safetensors has none); choose clip_g.safetensors for clip_g")
    if role == "clip_l":
        width = configs.shape(meta, "text_model.embeddings.token_embedding.weight", name)[1]
        meta["text_projection.weight"] = torch.empty(width, width, device="meta")
        sources.pop("text_projection.weight", None)
    model = _build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs.clip_config(meta, role, name))))
    own = model.state_dict()
    check_exact(own, meta, ROLE_LABEL[role], name, optional=("text_model.embeddings.position_ids",))
    needed = [sources[k] for k in own if k in sources]
    tensors.check_no_quantisation(needed, allowed=("text_model.embeddings.position_ids", "logit_scale",
                                                   "text_projection", "text_projection.weight"))
    tensors.check_dtypes(needed)
    plan = keep_fp32(model, dtype)
    values = {}
    for k in own:
        if k in sources:
            t = tensors.read(sources[k], plan(k))
            values[k] = t.T.contiguous() if sources[k] == "text_projection" else t
    if role == "clip_l":
        values["text_projection.weight"] = torch.eye(meta["text_projection.weight"].shape[0], dtype=dtype)
    model.load_state_dict(values, strict=False, assign=True)
    del values
    embeddings = model.text_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(model.config.max_position_embeddings).expand((1, -1)),
                               persistent=False)
    return _finish(model, ROLE_LABEL[role])


def t5_scales(tensors: Tensors, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{layer: scale_weight} of ComfyUI's scaled fp8 layout (empty for fp16 / plain fp8 files), checked as
    comfy/ops.py's scaled_fp8_op reads it: every Linear weight in the marker's fp8 type, one fp32 scalar per
    Linear (1 where a Linear has none), scale_input unused (text encoders: scale_input=False)."""
    name = tensors.name
    scale_keys = [k for k in tensors.keys if k.endswith(".scale_weight")]
    if SCALED_FP8 not in tensors:
        if scale_keys:
            raise tensors.refuse(f"it has {len(scale_keys)} scale_weight tensors (e.g. {tensors.full(scale_keys[0])}) "
                                 f"but no {SCALED_FP8} marker: a scaled layout ComfyUI does not read that way")
        return {}
    marker = tensors.dtype_name(SCALED_FP8)
    if marker not in FP8_DTYPES:
        raise tensors.refuse(f"its {SCALED_FP8} marker is {marker}, not an fp8 type: not ComfyUI's scaled fp8 layout")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    scales: dict[str, torch.Tensor] = {}
    for k in scale_keys:
        layer = k[: -len(".scale_weight")]
        if layer not in linears:
            raise tensors.refuse(f"{tensors.full(k)} scales {layer}, which is not a Linear layer of T5 (ComfyUI "
                                 "scales Linear weights only)")
        if tensors.dtype_name(k) not in FLOAT_DTYPES or tensors.source.shape(tensors.full(k)) not in ((), (1,)):
            raise tensors.refuse(f"{tensors.full(k)} is {tensors.dtype_name(k)} of shape "
                                 f"{tensors.source.shape(tensors.full(k))}, not one scalar per layer: another "
                                 "scaled format")
        scales[layer] = tensors.read(k, torch.float32).reshape(())
    for layer in linears:
        key = f"{layer}.weight"
        if key in tensors and tensors.dtype_name(key) != marker:
            raise tensors.refuse(f"in its {SCALED_FP8} layout ({marker}) the Linear weight {tensors.full(key)} is "
                                 f"{tensors.dtype_name(key)}: not a layout ComfyUI writes")
    bad = [k for k in tensors.keys if k.endswith(".scale_input") and k[: -len(".scale_input")] not in linears]
    if bad:
        raise tensors.refuse(f"{tensors.full(bad[0])} is not beside a Linear layer of T5")
    return scales


def build_t5(sd, name: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """T5 v1.1 encoder from transformers-layout keys (a file path, a state dict or Tensors), in `dtype`.

    Built on the meta device and assigned tensor by tensor: the peak is the network in `dtype` plus a small
    staging buffer. fp8: ComfyUI's scaled layout dequantised (weight.to(fp32) * scale_weight), plain fp8 cast.
    In fp16 the feed-forward output projections (`wo`) stay fp32, as transformers loads T5 (keep_fp32)."""
    from transformers import T5Config, T5EncoderModel

    tensors = _tensors(sd, name, "t5")
    name = tensors.name
    _check_role(tensors, "t5")
    marker_keys = {SCALED_FP8} | {k for k in tensors.keys if k.endswith((".scale_weight", ".scale_input"))}
    meta = tensors.meta([k for k in tensors.keys if k not in marker_keys])
    sources = {k: k for k in meta}
    if "shared.weight" not in meta and "encoder.embed_tokens.weight" in meta:
        meta["shared.weight"] = meta["encoder.embed_tokens.weight"]
        sources["shared.weight"] = "encoder.embed_tokens.weight"
    model = _build(lambda: T5EncoderModel(T5Config(**configs.t5_config(meta, name))))
    own = model.state_dict()
    tied = "encoder.embed_tokens.weight"  # the same tensor as shared.weight
    check_exact(own, meta, "T5", name, optional=(tied,))
    needed = [sources[k] for k in own if k != tied]
    tensors.check_no_quantisation(needed, allowed=marker_keys | {tied})
    tensors.check_dtypes(needed)
    scales = t5_scales(tensors, model)
    plan = keep_fp32(model, dtype)
    values = {}
    for k in own:
        if k != tied:
            values[k] = tensors.read(sources[k], plan(k), scales.get(k.rpartition(".")[0]))
    model.load_state_dict(values, strict=False, assign=True)
    del values
    model.encoder.embed_tokens.weight = model.shared.weight
    return _finish(model, "T5")


# ------------------------------------------------------------------------------- transformer, VAE
def build_transformer(tensors: Tensors, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as convert

    name = tensors.name
    meta = tensors.meta()
    model = _build(lambda: SD3Transformer2DModel(**configs.transformer_config(meta, name)))
    left = dict(meta)
    try:
        mapped = convert(left)  # on meta tensors: which keys it reads, and what it makes of them
    except KeyError as exc:
        raise UpscalerError(f"{name}: the transformer weights are incomplete (tensor "
                            f"{configs.TRANSFORMER_PREFIX}{exc.args[0]} missing); the file is damaged or not SD3 "
                            "medium: re-download it") from None
    check_exact(model.state_dict(), mapped, "transformer", name)
    used = [k for k in meta if k not in left]
    tensors.check_no_quantisation(used)
    tensors.check_dtypes(used)
    values = convert({k: tensors.read(k, dtype) for k in used})
    load_exact(model, values, "transformer", name)
    del values
    return _finish(model, "transformer")


def build_vae(tensors: Tensors, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    name, prefix = tensors.name, configs.VAE_PREFIX
    meta = tensors.meta()
    cfg = configs.vae_config(meta, name)
    model = _build(lambda: AutoencoderKL(**cfg))
    try:
        mapped = convert_ldm_vae_checkpoint({prefix + k: v for k, v in meta.items()}, cfg)
    except (KeyError, AttributeError) as exc:  # the converter trips over a missing tensor
        raise UpscalerError(f"{name}: the VAE weights are incomplete (the LDM VAE converter failed: "
                            f"{error_text(exc)}); the file is damaged or not SD3 medium: re-download it") from None
    check_exact(model.state_dict(), mapped, "VAE", name)
    tensors.check_no_quantisation(meta)
    tensors.check_dtypes(meta)
    values = convert_ldm_vae_checkpoint({prefix + k: tensors.read(k, dtype) for k in meta}, cfg)
    load_exact(model, values, "VAE", name)
    del values
    return _finish(model, "VAE")


# ------------------------------------------------------------------------------- the whole model
def _file_entry(path: Path, part: str) -> dict:
    return {"file": path.name, "sha256": sha256_of(path), "part": part}


def load_single_files(checkpoint: str | os.PathLike, text_files: dict[str, str | os.PathLike | None],
                      dirs: TokenizerDirs, use_t5: bool = True,
                      dtypes: tuple[torch.dtype, torch.dtype, torch.dtype] = FP32) -> CoZComponents:
    """Components from `checkpoint` and `text_files` {role: path} (a file given for a role is used in place of
    the checkpoint's own encoder), on the CPU in `dtypes` (transformer, VAE, text encoders)."""
    checkpoint = Path(checkpoint)
    name = checkpoint.name
    main_dtype, vae_dtype, text_dtype = dtypes
    source = open_weights(checkpoint, CHECKPOINT_FIX)
    if configs.SD3_KEY not in source:
        raise UpscalerError(f"{name} is not a Stable Diffusion 3 checkpoint (no {configs.SD3_KEY}; it is "
                            f"{_what(source.keys())}); Chain-of-Zoom needs {CHECKPOINT_FIX}")
    files = [_file_entry(checkpoint, "checkpoint")]
    transformer = build_transformer(Tensors(source, configs.TRANSFORMER_PREFIX, name, CHECKPOINT_FIX), main_dtype)
    vae = build_vae(Tensors(source, configs.VAE_PREFIX, name, CHECKPOINT_FIX), vae_dtype)

    encoders = {}
    for role in TEXT_ROLES:
        if role == "t5" and not use_t5:
            encoders[role] = None
            continue
        inside = Tensors(source, configs.TEXT_PREFIXES[role], name, ROLE_FIX[role])
        if text_files.get(role):
            path = Path(text_files[role])
            tensors = Tensors(open_weights(path, ROLE_FIX[role]), "", path.name, ROLE_FIX[role])
            files.append(_file_entry(path, role))
        elif inside:
            tensors = inside
        elif role == "t5":
            encoders[role] = None  # optional: the receipt says the embedding differs from the paper's
            continue
        else:
            raise UpscalerError(
                f"{name} has no {ROLE_LABEL[role]} text encoder: put {role}.safetensors in "
                "models/text_encoders (or models/clip) and choose it, or use sd3_medium_incl_clips.safetensors"
            )
        encoders[role] = (build_t5(tensors, dtype=text_dtype) if role == "t5"
                          else build_clip(tensors, role, dtype=text_dtype))
    _check_clip_widths(encoders, transformer, {f["part"]: f["file"] for f in files}, name)
    tokenizers = {"clip_l": clip_tokenizer(dirs.clip, "clip_l"), "clip_g": clip_tokenizer(dirs.clip, "clip_g"),
                  "t5": t5_tokenizer(dirs.t5) if encoders["t5"] is not None else None}
    return CoZComponents(transformer, vae, encoders["clip_l"], encoders["clip_g"], encoders["t5"], tokenizers, files)


def _check_clip_widths(encoders: dict, transformer, files: dict, name: str) -> None:
    """CLIP-L and CLIP-G side by side make the pooled input (768 + 1280 for SD3 medium); T5 the joint width."""
    width = {r: encoders[r].config.hidden_size for r in ("clip_l", "clip_g")}
    where = {r: files.get(r, name) for r in TEXT_ROLES}
    pooled = transformer.config.pooled_projection_dim
    if width["clip_l"] > width["clip_g"]:
        raise UpscalerError(f"the CLIP-L text encoder ({where['clip_l']}, width {width['clip_l']}) is wider than "
                            f"CLIP-G ({where['clip_g']}, width {width['clip_g']}): the two look swapped; choose "
                            "clip_l.safetensors for clip_l and clip_g.safetensors for clip_g")
    if width["clip_l"] + width["clip_g"] != pooled:
        raise UpscalerError(f"CLIP-L ({where['clip_l']}, width {width['clip_l']}) + CLIP-G ({where['clip_g']}, width "
                            f"{width['clip_g']}) do not make the transformer's pooled input ({pooled}): they are not "
                            "SD3 medium's text encoders; choose clip_l.safetensors and clip_g.safetensors")
    t5 = encoders.get("t5")
    joint = transformer.config.joint_attention_dim
    if t5 is not None and t5.config.d_model != joint:
        raise UpscalerError(f"the T5 encoder ({where['t5']}, width {t5.config.d_model}) does not match the "
                            f"transformer's text width ({joint}): it is not T5-XXL; choose {ROLE_FIX['t5']}")
