"""What loading Chain-of-Zoom's model will need, read from the files' headers before any tensor is, and the
dtypes that fit the memory that is free.

A load holds every network in its compute dtype plus, for a moment, the one tensor being read (in the file's
dtype) and its converted copy (single_file.py: meta-device networks, one tensor at a time, assign=True; the
diffusers loaders likewise with low_cpu_mem_usage). A .pt/.bin file is read whole first. The weights pass
through system RAM even on a GPU machine (ComfyUI's manager moves them from there), so the check is against
free host memory: the load is refused with the numbers and the fixes rather than let the operating system kill
the process (and the ComfyUI server with it). A 512 px step's working memory is counted too: a model that
loads but cannot take one step is no use.

dtype auto on the CPU is fp32 (the paper's precision); when fp32 does not fit, the text encoders go to bf16
(T5-XXL 19 -> 9.5 GB), then the transformer; the receipt lists each network's dtype and the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...runtime.dtypes import itemsize
from ...runtime.errors import UpscalerError
from ...tiling.memory import host_free_bytes
from . import configs
from .single_file import CHECKPOINT_FIX, ROLE_FIX, ROLE_LABEL, TEXT_ROLES, Tensors, open_weights

GB = 1024**3
PROCESS_SIZE = 512  # the paper's process size: the step a load must leave room for
FOLDER_PARTS = {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                "t5": "text_encoder_3"}
STORED_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
LABELS = {"transformer": "transformer", "vae": "VAE", **ROLE_LABEL}


@dataclass(frozen=True)
class LoadPlan:
    """Elements per network (transformer, vae, clip_l, clip_g, t5: those that will load), the largest tensor's
    elements and stored bytes, bytes of files read whole, and the shapes a step's working memory depends on."""

    elements: dict[str, int]
    largest: tuple[int, int] = (0, 0)  # (elements, stored bytes)
    read_whole: int = 0
    transformer_width: int = 1536
    vae_width: int = 128
    fp32_in_fp16: dict[str, int] = field(default_factory=dict)  # elements kept fp32 in an fp16 network (T5's wo)

    @staticmethod
    def role_dtype(role: str, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> torch.dtype:
        return dtypes[0] if role == "transformer" else dtypes[1] if role == "vae" else dtypes[2]

    def network_bytes(self, dtypes) -> dict[str, int]:
        def size(role: str, n: int) -> int:
            dtype = self.role_dtype(role, dtypes)
            kept = self.fp32_in_fp16.get(role, 0) if dtype == torch.float16 else 0
            return n * itemsize(dtype) + kept * 2

        return {r: size(r, n) for r, n in self.elements.items()}

    def weights_bytes(self, dtypes) -> int:
        return sum(self.network_bytes(dtypes).values())

    def load_peak_bytes(self, dtypes) -> int:
        """Estimated rise of the process's resident memory while loading (weights + one tensor in flight)."""
        n, stored = self.largest
        return self.weights_bytes(dtypes) + stored + n * 4 + self.read_whole

    def step_bytes(self, dtypes, process_size: int = PROCESS_SIZE) -> int:
        """Working memory of one step at `process_size` (the pack's per-pixel figures of step.py)."""
        from .step import TRANSFORMER_ELEMENTS_PER_CHANNEL, VAE_ELEMENTS_PER_CHANNEL

        latent_px = (process_size // configs.VAE_FACTOR) ** 2
        transformer = TRANSFORMER_ELEMENTS_PER_CHANNEL * self.transformer_width * itemsize(dtypes[0]) * latent_px
        vae = VAE_ELEMENTS_PER_CHANNEL * self.vae_width * itemsize(dtypes[1]) * latent_px
        canvases = 4 * 3 * process_size**2 * 4  # input, bicubic view, decoded, output: float32
        return max(transformer, vae) + canvases

    def need_bytes(self, dtypes, process_size: int = PROCESS_SIZE) -> int:
        return max(self.load_peak_bytes(dtypes), self.weights_bytes(dtypes) + self.step_bytes(dtypes, process_size))


def size_text(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB // 20 else f"{n / 2**20:.0f} MB"


KEEP_FP32 = {"t5": "wo"}  # transformers' _keep_in_fp32_modules: T5's feed-forward output stays fp32 in fp16


def _count(tensors: Tensors, keep: str | None = None) -> tuple[int, tuple[int, int], int]:
    """Elements of the float tensors under a prefix, the largest one's (elements, stored bytes), and the elements
    of the modules named `keep`."""
    total, largest, kept = 0, (0, 0), 0
    for key in tensors.keys:
        full = tensors.full(key)
        stored = STORED_ITEMSIZE.get(tensors.source.dtype_name(full))
        if stored is None:
            continue  # not a weight the network holds (markers; refused later by name where it matters)
        n = 1
        for s in tensors.source.shape(full):
            n *= s
        total += n
        largest = max(largest, (n, n * stored))
        kept += n if keep in key.split(".") else 0
    return total, largest, kept


def _widths(transformer: Tensors, vae: Tensors) -> dict:
    """Transformer width (patch embedding rows) and the VAE's first width (its last norm), in either layout."""
    found = {}
    for name, tensors, keys in (("transformer_width", transformer, ("x_embedder.proj.weight", "pos_embed.proj.weight")),
                                ("vae_width", vae, ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"))):
        for key in keys:
            if key in tensors:
                found[name] = tensors.source.shape(tensors.full(key))[0]
                break
    return found


def plan_single_files(checkpoint: str | os.PathLike, text_files: dict, use_t5: bool) -> LoadPlan:
    """The plan of load_single_files(checkpoint, text_files, use_t5): the same choice of file per network."""
    checkpoint = Path(checkpoint)
    source = open_weights(checkpoint, CHECKPOINT_FIX)
    parts = {"transformer": Tensors(source, configs.TRANSFORMER_PREFIX, checkpoint.name, ""),
             "vae": Tensors(source, configs.VAE_PREFIX, checkpoint.name, "")}
    read_whole = 0
    for role in TEXT_ROLES:
        if role == "t5" and not use_t5:
            continue
        if text_files.get(role):
            path = Path(text_files[role])
            opened = open_weights(path, ROLE_FIX[role])
            if not hasattr(opened, "infos"):  # a .pt/.bin file: read whole before it is converted
                read_whole = max(read_whole, path.stat().st_size)
            parts[role] = Tensors(opened, "", path.name, "")
        else:
            inside = Tensors(source, configs.TEXT_PREFIXES[role], checkpoint.name, "")
            if inside:
                parts[role] = inside
    return _plan(parts, read_whole)


def plan_diffusers_folder(folder: str | os.PathLike, use_t5: bool) -> LoadPlan:
    """The plan of load_diffusers_folder: each component folder's safetensors files (or .bin, read whole)."""
    from ..loading import SafetensorsFile

    folder = Path(folder)
    parts, read_whole = {}, 0
    for role, sub in FOLDER_PARTS.items():
        if role == "t5" and not use_t5:
            continue
        files = sorted((folder / sub).glob("*.safetensors"))
        if not files:
            binaries = sorted((folder / sub).glob("*.bin"))
            if binaries:  # fp32 as published; read whole
                size = sum(p.stat().st_size for p in binaries)
                parts[role] = size // 4
                read_whole = max(read_whole, size)
            continue
        shards = [Tensors(SafetensorsFile(p), "", p.name, "") for p in files]
        parts[role] = shards
    return _plan(parts, read_whole)


def _plan(parts: dict, read_whole: int) -> LoadPlan:
    elements, largest, widths, fp32_in_fp16 = {}, (0, 0), {}, {}
    for role, part in parts.items():
        if isinstance(part, int):
            elements[role] = part
            continue
        total = kept_total = 0
        for tensors in part if isinstance(part, list) else [part]:
            n, big, kept = _count(tensors, KEEP_FP32.get(role))
            total, largest, kept_total = total + n, max(largest, big), kept_total + kept
        elements[role] = total
        if kept_total:
            fp32_in_fp16[role] = kept_total
    first = lambda p: p[0] if isinstance(p, list) else p  # noqa: E731 - the shard that holds the named keys
    if not isinstance(parts.get("transformer"), int) and not isinstance(parts.get("vae"), int) \
            and "transformer" in parts and "vae" in parts:
        widths = _widths(first(parts["transformer"]), first(parts["vae"]))
    return LoadPlan(elements, largest, read_whole, fp32_in_fp16=fp32_in_fp16, **widths)


def plan_load(base: str | os.PathLike, text_files: dict | None, use_t5: bool) -> LoadPlan:
    base = Path(base)
    return plan_diffusers_folder(base, use_t5) if base.is_dir() else plan_single_files(base, text_files or {}, use_t5)


def fit_dtypes(plan: LoadPlan, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], requested: str,
               free: int) -> tuple[tuple[torch.dtype, torch.dtype, torch.dtype], str | None]:
    """The dtypes to load in, and a note when auto lowered one to fit `free` bytes; refuses when nothing fits."""
    need = plan.need_bytes(dtypes)
    if need <= free:
        return dtypes, None
    if requested == "auto":
        bf16 = torch.bfloat16
        for lowered in ((dtypes[0], dtypes[1], bf16), (bf16, dtypes[1], bf16)):
            if lowered != dtypes and plan.need_bytes(lowered) <= free:
                lowered_names = [LABELS[r] for r in plan.elements
                                 if plan.role_dtype(r, lowered) != plan.role_dtype(r, dtypes)]
                return lowered, (f"{', '.join(lowered_names)} in bf16 (dtype auto): in {_names(dtypes)} loading and "
                                 f"a {PROCESS_SIZE} px step need {size_text(need)}, {size_text(free)} were free")
    raise UpscalerError(refusal(plan, dtypes, requested, free))


def _names(dtypes) -> str:
    from ...runtime.dtypes import dtype_name

    return "/".join(dict.fromkeys(dtype_name(d) for d in dtypes))


def refusal(plan: LoadPlan, dtypes, requested: str, free: int) -> str:
    sizes = plan.network_bytes(dtypes)
    parts = ", ".join(f"{LABELS[r]} {size_text(b)}" for r, b in sorted(sizes.items(), key=lambda kv: -kv[1]))
    fixes = []
    if "t5" in sizes:
        fixes.append(f"set t5xxl to none (saves {size_text(sizes['t5'])}; the prompt embedding then differs "
                     "from the paper's)")
    smallest = (torch.bfloat16, dtypes[1], torch.bfloat16)  # what dtype auto falls back to (the VAE stays)
    if requested != "auto":  # an explicit dtype is never changed; auto lowers what does not fit
        fixes.append(f"dtype auto (text encoders, then the transformer, in bf16 as needed: at least "
                     f"{size_text(plan.need_bytes(smallest))})")
    fixes.append(f"close other programs or models to free memory, or use a machine with more RAM (at least "
                 f"{size_text(plan.need_bytes(smallest))} free)")
    return (f"Loading Chain-of-Zoom's model needs about {size_text(plan.need_bytes(dtypes))} of memory "
            f"({parts} in {_names(dtypes)}, plus a {PROCESS_SIZE} px step) but only {size_text(free)} are free: "
            f"nothing was loaded. Fix: " + "; or ".join(fixes))


def check_before_load(base, text_files, use_t5: bool, dtypes, requested: str, free: int | None = None):
    """(dtypes to load in, what the receipt says of it); raises UpscalerError when even bf16 does not fit."""
    plan = plan_load(base, text_files, use_t5)
    free = host_free_bytes() if free is None else free
    chosen, note = fit_dtypes(plan, dtypes, requested, free)
    # the receipt keeps what decides the result (free memory only where it changed a dtype: in the note), so two
    # runs of the same settings keep equal receipts
    return chosen, {"estimated_gb": round(plan.need_bytes(chosen) / GB, 2), "note": note}
