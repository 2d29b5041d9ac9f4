#!/usr/bin/env python
"""Real-size memory and time: the published networks with random weights, in the published file layouts, loaded
and run through the pack's own loaders and driver on this machine's CPU.

Memory and time do not depend on weight values, so the networks are built once at their published sizes with
random weights (normal, std 0.02; norm weights 1), written in the layouts users have, into a cache folder outside
the repository (--cache, default ~/.cache/dreamforge_real_size):

* sd3/checkpoints/sd3_medium.safetensors -- SD3 medium's MMDiT (2.0 B) + VAE, fp16, ComfyUI's original keys;
  sd3/text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors (fp16, ComfyUI's layout);
  sd3/loras/chain-of-zoom/model_20001.pkl and vae_encoder_20001.pt (Chain-of-Zoom's two LoRA files, published
  shapes). About 15.4 GB; written tensor by tensor (no second copy of a network is held).
* sdx4/stable-diffusion-x4-upscaler/ -- the diffusers folder (UNet 473 M, VAE, OpenCLIP-H text tower, fp32 as
  published). About 3.5 GB.

Each case runs in a fresh process; peak = the kernel's resident high-water mark (VmHWM, reset before the measured
call) above the RSS just before it:

* coz        -- Load Chain-of-Zoom Model (sd3_medium.safetensors + the three text encoder files + both LoRA), then
                one Chain-of-Zoom step through the driver at process size 512 (a 128 px input, dtype auto: what
                the CPU runs);
* coz_no_t5  -- the same with T5 set to none;
* sdx4_128   -- SD x4 load, then 128² -> 512² with 2 steps (seconds per UNet step reported, and 50 steps
                extrapolated from it);
* sdx4_512   -- SD x4 load, then 512² -> 2048² with 1 step;
* vae_1024   -- SD x4 load, then the VAE decode of a 1024² latent -> 4096² alone.

Beside each measurement: the pack's own estimate (Chain-of-Zoom: memory_plan.plan_load(...).load_peak_bytes
and .step_bytes; SD x4: parameter bytes in the compute dtype, and the sampler's bytes per pixel over the
windows the receipt reports). Goals: a load peaks at <= 1.2x the bytes its networks occupy in their compute
dtype; each estimate is within 25% of its measured peak; the 512 px Chain-of-Zoom step runs without swapping.
Exit 0 only when every goal of the cases run holds; the last line lists each measured peak beside its estimate.

    .venv/bin/python benchmarks/real_size.py                       # everything: builds on first use (~20 GB disk)
    .venv/bin/python benchmarks/real_size.py --cases sdx4_128      # one case
    .venv/bin/python benchmarks/real_size.py --build-only          # only build the files

With DREAMFORGE_BENCH_SMOKE=1 the same code runs at the tests' tiny sizes in a temporary cache (numbers mean
nothing), and the real-size layouts are built on the meta device and counted, not written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "benchmarks")]

import bench_smoke  # noqa: E402
import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402

GiB = 1024**3
CASES = ("coz", "coz_no_t5", "sdx4_128", "sdx4_512", "vae_1024")
DEFAULT_CACHE = Path("~/.cache/dreamforge_real_size")
LOAD_RATIO_GOAL = 1.2
ESTIMATE_GOAL = 0.25
STD = 0.02
PROMPT = "a photo of an astronaut"

# Published configs (the diffusers configs of SD3 medium and its text encoders), written here rather than taken
# from the pack, so that a wrong config in the pack shows as a load failure instead of hiding.
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
# x4-upscaling.yaml / the diffusers folder: UNet base 256 (x 1, 2, 2, 4), cross-attention 1024, VAE 128 (x 1, 2, 4),
# text tower 1024 wide with the 23 layers the diffusers folder keeps (the pipeline uses the penultimate of 24).
SDX4_SIZES = dict(unet_channels=256, vae_channels=128, groups=32, context_dim=1024, text_width=1024, text_layers=23)
SD3_TEXT_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors"}
BUILD_VERSION = 1  # bump when what is built changes: the cache is rebuilt


def real() -> bool:
    return not bench_smoke.smoke()


# ------------------------------------------------------------------------------------------------ building
def sd3_networks(real_size: bool) -> dict:
    """transformer, vae, clip_l, clip_g, t5. Real size: on the meta device (shapes only; values are drawn as each
    tensor is written), except the VAE (84 M, real values: the VAE LoRA file carries its encoder's base tensors).
    Tiny: the tests' tiny SD3 (tests/tiny_sd3.py)."""
    import tiny_sd3

    if not real_size:
        return tiny_sd3.build_components(0)
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        nets = {"transformer": SD3Transformer2DModel(**SD3_TRANSFORMER),
                "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
                "t5": T5EncoderModel(T5Config(**T5_XXL))}
    torch.manual_seed(0)
    nets["vae"] = AutoencoderKL(**SD3_VAE).eval()
    return nets


def sd3_layouts(nets: dict) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> {key: tensor (meta: shape only)} in the published layouts (tests/tiny_sd3.py's converters)."""
    import tiny_sd3

    depth = nets["transformer"].config.num_layers
    return {"sd3_medium.safetensors": {**tiny_sd3.mmdit_state_dict(nets["transformer"], depth=depth),
                                       **tiny_sd3.vae_state_dict(nets["vae"])},
            **{file: tiny_sd3.text_state_dict(nets[role], role) for role, file in SD3_TEXT_FILES.items()}}


def fill(key: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The fp16 tensor written for `key`: its own values, or (meta) 1 for a norm's weight, else normal(0, STD)."""
    if not t.is_meta:
        return t.detach().to(torch.float16).contiguous()
    if t.dim() == 1 and "norm" in key and key.endswith("weight"):
        return torch.ones(t.shape, dtype=torch.float16)
    return torch.empty(t.shape, dtype=torch.float32).normal_(0, STD, generator=gen).half()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], seed: int = 0) -> int:
    """A safetensors file of fp16 tensors written one at a time (only the tensor being written is in memory);
    returns the bytes of its tensors."""
    entries, offset = {}, 0
    for key, t in tensors.items():
        size = t.numel() * 2
        entries[key] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    gen = torch.Generator().manual_seed(seed)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for key, t in tensors.items():
            value = fill(key, t, gen)
            assert tuple(value.shape) == tuple(t.shape), key
            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
            del value
    os.replace(partial, path)
    return offset


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd3_paths(root: Path) -> dict:
    from dreamforge_upscale.upscalers.coz_sd3 import LORA_FOLDER

    sd3 = root / "sd3"
    return {"checkpoint": sd3 / "checkpoints" / "sd3_medium.safetensors",
            **{role: sd3 / "text_encoders" / file for role, file in SD3_TEXT_FILES.items()},
            "transformer_lora": sd3 / "loras" / LORA_FOLDER / "model_20001.pkl",
            "vae_lora": sd3 / "loras" / LORA_FOLDER / "vae_encoder_20001.pt", "manifest": sd3 / "built.json"}


def sdx4_paths(root: Path) -> dict:
    return {"folder": root / "sdx4" / "stable-diffusion-x4-upscaler", "manifest": root / "sdx4" / "built.json"}


def built(manifest: Path, paths: list[Path]) -> bool:
    """The manifest names this size and build version, and every file is there with the size it had."""
    if not manifest.is_file():
        return False
    info = json.loads(manifest.read_text())
    return (info.get("real") == real() and info.get("version") == BUILD_VERSION and all(p.exists() for p in paths)
            and all(Path(f).is_file() and Path(f).stat().st_size == s for f, s in info.get("files", {}).items()))


def build_sd3(root: Path) -> dict:
    import tiny_sd3

    paths = sd3_paths(root)
    files = [p for k, p in paths.items() if k != "manifest"]
    if built(paths["manifest"], files):
        return json.loads(paths["manifest"].read_text())
    started = time.perf_counter()
    print(f"building SD3 medium + Chain-of-Zoom LoRA ({'real size' if real() else 'tiny'}) in {paths['manifest'].parent}",
          flush=True)
    nets = sd3_networks(real())
    layouts = sd3_layouts(nets)
    written = {}
    for file, tensors in layouts.items():
        path = paths["checkpoint"] if file == "sd3_medium.safetensors" else paths["checkpoint"].parent.parent / \
            "text_encoders" / file
        t0 = time.perf_counter()
        written[file] = write_safetensors(path, tensors, seed=len(written))
        print(f"  {path.name}: {written[file] / GiB:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    del layouts
    lora = tiny_sd3.write_lora_files(paths["transformer_lora"].parent, comps=nets)
    assert lora["transformer"] == paths["transformer_lora"] and lora["vae"] == paths["vae_lora"], lora
    info = {"real": real(), "version": BUILD_VERSION, "seconds": round(time.perf_counter() - started, 1),
            "parameters": {k: parameters(m) for k, m in nets.items()},
            "files": {str(p): p.stat().st_size for p in files}}
    paths["manifest"].write_text(json.dumps(info, indent=1))
    return info


def build_sdx4(root: Path) -> dict:
    import tiny_sdx4

    paths = sdx4_paths(root)
    folder = paths["folder"]
    if built(paths["manifest"], [folder]):
        return json.loads(paths["manifest"].read_text())
    started = time.perf_counter()
    print(f"building the SD x4 upscaler ({'real size' if real() else 'tiny'}) in {folder}", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # the networks in fp32 (as published: ~3.5 GB at real size), saved one component at a time
    tiny_sdx4.write_diffusers_folder(partial, 0, **(SDX4_SIZES if real() else {}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    info = {"real": real(), "version": BUILD_VERSION, "seconds": round(time.perf_counter() - started, 1),
            "parameters": {part: safetensors_elements(folder / part) for part in ("unet", "vae", "text_encoder")},
            "files": {str(p): p.stat().st_size for p in files}}
    paths["manifest"].write_text(json.dumps(info, indent=1))
    return info


def safetensors_elements(folder: Path) -> int:
    """Elements of the floating-point tensors of a component folder's safetensors files (headers only)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in ("F32", "F16", "BF16", "F64"):
                n = 1
                for s in entry["shape"]:
                    n *= s
                total += n
    return total


def real_size_layout_check() -> dict:
    """Smoke mode: SD3 medium's networks at real size on the meta device, through the same layout converters --
    what a real build would write (GiB in fp16), without writing it."""
    nets = sd3_networks(True)
    out = {file: round(sum(t.numel() for t in tensors.values()) * 2 / GiB, 2)
           for file, tensors in sd3_layouts(nets).items()}
    return {"parameters_M": {k: round(parameters(m) / 1e6, 1) for k, m in nets.items()}, "file_GiB_fp16": out}


# ------------------------------------------------------------------------------------------------ measuring
def vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        return int(re.search(rf"^{name} (\d+)$", f.read(), re.M).group(1))


def status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def meminfo(name: str) -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class StageClock:
    """Seconds inside each named module's forward (summed over calls), and how many calls."""

    def __init__(self, **modules):
        from collections import defaultdict

        self.seconds, self.calls, self._start = defaultdict(float), defaultdict(int), {}
        for name, module in modules.items():
            if module is None:
                continue
            module.register_forward_pre_hook(lambda *_, n=name: self._start.__setitem__(n, time.perf_counter()))
            module.register_forward_hook(lambda *_, n=name: self._stop(n))

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(name)
        self.calls[name] += 1

    def report(self) -> dict:
        return {k: round(v, 2) for k, v in self.seconds.items()}


def tensor_bytes(*modules) -> int:
    """Bytes the networks hold (parameters and buffers, in the dtypes they were loaded in)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def touch(*modules) -> None:
    """Read one element per page of every weight: a loader that leaves tensors mapped from the file (diffusers'
    safetensors mmap) has them resident only once they are read, which the first step does anyway."""
    with torch.no_grad():
        for module in modules:
            if module is None:
                continue
            for t in (*module.parameters(), *module.buffers()):
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()


def measured_load(load_fn, networks) -> dict:
    """Peak of the load call and of the weights being read once after it (one phase: above the RSS before the
    load), with the file-backed and anonymous RSS after the load call."""
    from peak_memory import measure_peak

    load = measure_peak(load_fn)
    after = {"rss_file": status_kb("RssFile"), "rss_anon": status_kb("RssAnon")}
    model = load.value
    touched = measure_peak(lambda: touch(*networks(model)))
    return {"model": model, "peak": max(load.above, touched.baseline + touched.above - load.baseline),
            "peak_load_call": load.above, "seconds": load.seconds, "seconds_first_read": touched.seconds,
            "method": load.method, "after_load_call": after,
            "after_first_read": {"rss_file": status_kb("RssFile"), "rss_anon": status_kb("RssAnon")}}


def error(estimate: float, measured: float) -> float:
    return (estimate - measured) / measured if measured > 0 else float("inf")


def test_image(side: int) -> torch.Tensor:
    """A photo at side x side, B,H,W,C in 0..1 (the driver's image layout)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(photo).copy()).float().div(255)[None]


def child_coz(root: Path, use_t5: bool) -> dict:
    from peak_memory import measure_peak, rss, trim_heap
    from receipt_fields import first_pass

    import tiny_sd3
    from dreamforge_upscale.upscalers import UpscaleRequest, upscale
    from dreamforge_upscale.upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler, TokenizerDirs

    from dreamforge_upscale.upscalers.coz_sd3.memory_plan import plan_load

    paths = sd3_paths(root)
    text_files = {r: paths[r] for r in ("clip_l", "clip_g", "t5") if use_t5 or r != "t5"}
    dirs = TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir())
    trim_heap()
    start = rss()
    plan = plan_load(paths["checkpoint"], text_files, use_t5)
    load = measured_load(lambda: CoZSD3Upscaler.load(paths["checkpoint"], paths["transformer_lora"],
                                                     paths["vae_lora"], text_files=text_files, tokenizer_dirs=dirs,
                                                     use_t5=use_t5, dtype="auto", device=torch.device("cpu")),
                         lambda m: (m.comps.transformer, m.comps.vae, m.comps.clip_l, m.comps.clip_g, m.comps.t5))
    model = load.pop("model")
    c = model.comps
    dtypes = (model.dtype, model.vae_dtype, model.text_dtype)
    weights = tensor_bytes(c.transformer, c.vae, c.clip_l, c.clip_g, c.t5)
    side = 128 if real() else 32  # process size 512 (tiny model: 128, inside its position grid)
    process = 4 * side
    clock = StageClock(transformer=c.transformer, vae_encoder=c.vae.encoder, vae_decoder=c.vae.decoder,
                       clip_l=c.clip_l, clip_g=c.clip_g, t5=c.t5)
    image = test_image(side)
    step = measure_peak(lambda: upscale(model, image, UpscaleRequest(options=CoZOptions(), seed=0, prompt=PROMPT)))
    out, receipt = step.value
    backend = first_pass(receipt)["backend"]
    return {
        "networks": model.networks(), "load_memory": model.load_memory, "process_size": process,
        "weights_bytes": weights, "start_rss": start,
        "load": {**load, "estimate": plan.load_peak_bytes(dtypes)},
        "step": {"peak": step.above, "estimate": plan.step_bytes(dtypes, process), "seconds": step.seconds,
                 "stages": clock.report(), "method": step.method,
                 "transformer_tiles": backend.get("transformer_tiles", {}).get("count"),
                 "output": list(out.shape)},
        "process_peak": max(load["peak"], step.baseline + step.above - start),
    }


def sdx4_load(root: Path):
    """(model, load record): SD x4 from the diffusers folder through SDX4Upscaler.load (dtype auto)."""
    from peak_memory import rss, trim_heap

    from dreamforge_upscale.upscalers.sdx4 import SDX4Upscaler
    from dreamforge_upscale.upscalers.sdx4.backend import select_dtypes

    folder = sdx4_paths(root)["folder"]
    unet_dtype, vae_dtype = select_dtypes("auto", torch.device("cpu"))
    item = lambda d: torch.finfo(d).bits // 8  # noqa: E731
    estimate = ((safetensors_elements(folder / "unet") + safetensors_elements(folder / "text_encoder"))
                * item(unet_dtype) + safetensors_elements(folder / "vae") * item(vae_dtype))
    trim_heap()
    start = rss()
    load = measured_load(lambda: SDX4Upscaler.load(folder, dtype="auto", device=torch.device("cpu")),
                         lambda m: (m.comps.unet, m.comps.vae, m.comps.text_encoder))
    model = load.pop("model")
    c = model.comps
    return model, start, {**load, "estimate": estimate, "weights_bytes": tensor_bytes(c.unet, c.vae, c.text_encoder)}


def decode_estimate(model, vae_tiles: dict, out_px: int) -> int:
    """The sampler's VAE figure over the largest latent it decodes at once (a window, or the statistics pass),
    plus the float32 output canvas twice (the blend accumulator and the image); the one pass decodes one window
    at a time, its parked windows on the device counted as planned (in files or host RAM they are not the
    process's memory)."""
    from dreamforge_upscale.upscalers.sdx4 import sampler

    window = vae_tiles["window"][0] * vae_tiles["window"][1]
    stats = vae_tiles.get("statistics") or {}
    latent_px = window if stats.get("one_pass") else max(window, stats.get("side", 0) ** 2)
    parked = stats.get("parked_bytes", 0) if stats.get("parked") == "device" else 0
    return int(sampler.vae_bytes_per_pixel(model.comps, model.vae_dtype) * latent_px + parked + 2 * out_px * 3 * 4)


def child_sdx4(root: Path, side: int, steps: int) -> dict:
    from peak_memory import measure_peak
    from receipt_fields import first_pass

    from dreamforge_upscale.upscalers import UpscaleRequest, upscale
    from dreamforge_upscale.upscalers.sdx4 import SDX4Options, sampler

    model, start, load = sdx4_load(root)
    c = model.comps
    opts = SDX4Options(steps=steps)
    clock = StageClock(unet=c.unet, vae_decoder=c.vae.decoder, text_encoder=c.text_encoder)
    image = test_image(side)
    step = measure_peak(lambda: upscale(model, image, UpscaleRequest(options=opts, seed=0)))
    out, receipt = step.value
    backend = first_pass(receipt)["backend"]
    cfg = opts.guidance > 1.0
    unet_window = backend["unet_tiles"]["window"]
    unet_work = sampler.unet_bytes_per_pixel(c, model.dtype, cfg) * unet_window[0] * unet_window[1]
    out_px = out.shape[1] * out.shape[2]
    vae_work = decode_estimate(model, backend["vae_tiles"], out_px)
    seconds = clock.report()
    per_step = seconds.get("unet", 0.0) / steps
    return {
        "dtypes": {"unet": str(model.dtype), "vae": str(model.vae_dtype)}, "side": side, "steps": steps,
        "guidance": opts.guidance, "start_rss": start, "weights_bytes": load.pop("weights_bytes"), "load": load,
        "step": {"peak": step.above, "estimate": int(max(unet_work, vae_work)), "seconds": step.seconds,
                 "unet_estimate": int(unet_work), "vae_estimate": int(vae_work), "stages": seconds,
                 "seconds_per_unet_step": round(per_step, 2),
                 "seconds_50_steps": round(step.seconds - seconds.get("unet", 0.0) + 50 * per_step, 1),
                 "unet_tiles": backend["unet_tiles"], "vae_tiles": backend["vae_tiles"], "output": list(out.shape)},
        "process_peak": max(load["peak"], step.baseline + step.above - start),
    }


def child_vae(root: Path, latent: int) -> dict:
    from peak_memory import measure_peak

    from dreamforge_upscale.tiling import RunHooks
    from dreamforge_upscale.upscalers.sdx4 import SDX4Options, sampler

    model, start, load = sdx4_load(root)
    c = model.comps
    z = torch.randn(1, c.vae.config.latent_channels, latent, latent,
                    generator=torch.Generator().manual_seed(0)) * c.vae.config.scaling_factor

    def decode():
        with torch.inference_mode():
            return sampler.decode(c, z, SDX4Options(), torch.device("cpu"), model.vae_dtype, RunHooks())

    step = measure_peak(decode)
    out, report = step.value
    return {
        "dtypes": {"vae": str(model.vae_dtype)}, "latent": latent, "start_rss": start,
        "weights_bytes": load.pop("weights_bytes"), "load": load,
        "step": {"peak": step.above, "estimate": decode_estimate(model, report["vae_tiles"], out.shape[1] * out.shape[2]),
                 "seconds": step.seconds, "vae_tiles": report["vae_tiles"], "output": list(out.shape)},
        "process_peak": max(load["peak"], step.baseline + step.above - start),
    }


def child(case: str, root: Path) -> dict:
    import resource

    bench_smoke.limit_threads()
    swap_out, faults = vmstat("pswpout"), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    if case in ("coz", "coz_no_t5"):
        result = child_coz(root, use_t5=case == "coz")
    elif case == "sdx4_128":
        result = child_sdx4(root, bench_smoke.capped(128, 32), 1 if bench_smoke.smoke() else 2)
    elif case == "sdx4_512":
        result = child_sdx4(root, bench_smoke.capped(512, 48), 1)
    elif case == "vae_1024":
        result = child_vae(root, bench_smoke.capped(1024, 64))
    else:
        raise SystemExit(f"unknown case {case}")
    result.update(case=case, swap_pages_out=vmstat("pswpout") - swap_out, vm_swap=status_kb("VmSwap"),
                  major_faults=resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
                  swap_total=meminfo("SwapTotal"), mem_total=meminfo("MemTotal"), threads=torch.get_num_threads())
    return result


# ------------------------------------------------------------------------------------------------ the report
def goals(r: dict) -> list[tuple[str, bool]]:
    out = []
    ratio = r["load"]["peak"] / r["weights_bytes"]
    out.append((f"load peak <= {LOAD_RATIO_GOAL}x weights ({ratio:.2f}x)", ratio <= LOAD_RATIO_GOAL))
    for phase in ("load", "step"):
        e = error(r[phase]["estimate"], r[phase]["peak"])
        out.append((f"{phase} estimate within {ESTIMATE_GOAL:.0%} ({e:+.0%})", abs(e) <= ESTIMATE_GOAL))
    if r["case"] in ("coz", "coz_no_t5"):
        swapped = r["swap_pages_out"] > 0 or r["vm_swap"] > 0
        out.append((f"{r['process_size']} px step without swapping ({r['swap_pages_out']} pages out)", not swapped))
    return out


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def describe(r: dict) -> str:
    load, step = r["load"], r["step"]
    lines = [f"{r['case']}: " + ", ".join(f"{k} {v}" for k, v in (r.get("networks") or r["dtypes"]).items() if v)]
    if r.get("load_memory") and r["load_memory"].get("note"):
        lines.append(f"  dtype note: {r['load_memory']['note']}")
    lines.append(f"  load  peak {gib(load['peak'])} GiB above start, weights {gib(r['weights_bytes'])} GiB in compute "
                 f"dtype (ratio {load['peak'] / r['weights_bytes']:.2f}), estimate {gib(load['estimate'])} GiB "
                 f"({error(load['estimate'], load['peak']):+.1%}), {load['seconds']:.1f} s + "
                 f"{load['seconds_first_read']:.1f} s to read every weight once")
    a, b = load["after_load_call"], load["after_first_read"]
    lines.append(f"        the load call alone {gib(load['peak_load_call'])} GiB; RSS file-backed/anonymous "
                 f"{gib(a['rss_file'])}/{gib(a['rss_anon'])} GiB after it, {gib(b['rss_file'])}/{gib(b['rss_anon'])} "
                 "GiB once every weight was read")
    what = "decode" if r["case"] == "vae_1024" else "step"
    extra = ""
    if "seconds_per_unet_step" in step:
        extra = (f", {step['seconds_per_unet_step']:.1f} s per UNet step ({r['steps']} steps, guidance "
                 f"{r['guidance']}: 50 steps ~ {step['seconds_50_steps']:.0f} s)")
    lines.append(f"  {what:5} peak {gib(step['peak'])} GiB above the loaded model, estimate {gib(step['estimate'])} "
                 f"GiB ({error(step['estimate'], step['peak']):+.1%}), {step['seconds']:.1f} s{extra}")
    if step.get("stages"):
        lines.append("  stage seconds: " + ", ".join(f"{k} {v}" for k, v in step["stages"].items()))
    lines.append(f"  process peak {gib(r['process_peak'])} GiB above start (machine {gib(r['mem_total'])} GiB, swap "
                 f"{gib(r['swap_total'])} GiB, {r['swap_pages_out']} pages swapped out, {r.get('major_faults', 0)} major page "
                 f"faults); output {step['output']}")
    lines += [f"  goal: {text}: {'ok' if ok else 'NOT MET'}" for text, ok in r["goals"]]
    return "\n".join(lines)


def summary(results: dict) -> str:
    parts = []
    for case, r in results.items():
        if "error" in r:
            parts.append(f"{case} failed")
            continue
        what = "decode" if case == "vae_1024" else "step"
        parts.append(f"{case} load {gib(r['load']['peak'])}/{gib(r['load']['estimate'])} "
                     f"{what} {gib(r['step']['peak'])}/{gib(r['step']['estimate'])}")
    return "peaks measured/estimate GiB: " + " | ".join(parts)


def run_case(case: str, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--cache", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600 if bench_smoke.smoke() else None)
    if proc.returncode:
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"case": case, "error": f"exit {proc.returncode}{killed}: {proc.stderr[-3000:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["goals"] = goals(result)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring.")
    ap.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all; smoke: all but sdx4_512, "
                                    "whose code is sdx4_128's)")
    ap.add_argument("--cache", type=Path, help=f"where the files are built (default {DEFAULT_CACHE}; smoke: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--build-only", action="store_true", help="build the files the cases need, and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache)))
        return 0
    # smoke: one case per child function (coz_no_t5 and sdx4_512 run the code of coz and sdx4_128)
    default = [c for c in CASES if c not in ("sdx4_512", "coz_no_t5")] if bench_smoke.smoke() else list(CASES)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else default
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    scratch = bench_smoke.smoke() and args.cache is None
    root = Path(tempfile.mkdtemp(prefix="real-size-")) if scratch else (args.cache or DEFAULT_CACHE).expanduser()
    try:
        return run(args, ap, cases, root)
    finally:
        if scratch:
            shutil.rmtree(root, ignore_errors=True)


def run(args, ap, cases: list[str], root: Path) -> int:
    if root.resolve().is_relative_to(REPO):
        ap.error(f"--cache {root} is inside the repository: model files are not written there")
    bench_smoke.limit_threads()
    record: dict = {"cache": str(root), "real_size": real()}
    if bench_smoke.smoke():
        record["real_size_layouts"] = real_size_layout_check()
        print(f"real-size layouts (meta device, not written): {json.dumps(record['real_size_layouts'])}", flush=True)
    if any(c.startswith("coz") for c in cases):
        record["build_sd3"] = build_sd3(root)
    if any(c.startswith(("sdx4", "vae")) for c in cases):
        record["build_sdx4"] = build_sdx4(root)
    for name in ("build_sd3", "build_sdx4"):
        if name in record:
            params = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in record[name]["parameters"].items())
            print(f"{name[6:]}: {params}; {sum(record[name]['files'].values()) / GiB:.2f} GiB on disk (built in "
                  f"{record[name]['seconds']:.0f} s)")
    if args.build_only:
        return 0
    results = {}
    if bench_smoke.smoke():  # tiny cases: two at a time (one thread each); real cases one after another, alone
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            done = dict(zip(cases, pool.map(lambda c: run_case(c, root), cases)))
    for case in cases:
        print(f"\n[{case}] in a fresh process", flush=True)
        results[case] = r = done[case] if bench_smoke.smoke() else run_case(case, root)
        print(describe(r) if "error" not in r else f"{case}: FAILED {r['error']}", flush=True)
    record["results"] = results
    if args.json:
        path = bench_smoke.out_path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
    met = all("error" not in r and all(ok for _, ok in r["goals"]) for r in results.values())
    ran = all("error" not in r for r in results.values())
    if bench_smoke.smoke():
        print(bench_smoke.note())
    print("\n" + ("every goal met" if met else "some goal NOT met") + "; " + summary(results))
    return 0 if (ran if bench_smoke.smoke() else met) else 1


if __name__ == "__main__":
    sys.exit(main())
