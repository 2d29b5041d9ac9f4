#!/usr/bin/env python
"""One command for a CUDA machine: every speed/memory number the pack claims on a GPU, in one table.

* GAN -- Compact (realesr-animevideov3) and RRDB 23 blocks (RealESRGAN_x4plus, or random weights of
         the same architecture when the file is absent), 1024² -> 4096²: ours fp32 / fp16 / bf16 (tile=0,
         the cost model's plan, equal tiles batched per call), ComfyUI core's node (fp32, its own
         512 px tiles; skipped when ComfyUI is not importable) and the plain untiled call (fp32), and on
         CUDA ours fp16 with torch.compile;
         output MP/s and peak VRAM (torch.cuda.max_memory_allocated) per variant.
* SD x4 -- the published architecture at its real widths (UNet 256 base channels, cross-attention 1024,
         VAE 128, OpenCLIP-H-wide text tower) with random weights, fp16 UNet, 512² -> 2048² and
         1024² -> 4096², planned for a 12 GB card (the host reports --vram-gb free): seconds and peak VRAM.
* CoZ SD3 -- Chain-of-Zoom's SR model: SD3-medium-wide transformer (24 x 64 = 1536) and VAE with random
         weights (text encoders at full width, 2 layers), 128² -> 512², one step.

    .venv/bin/python benchmarks/gpu_suite.py            # CUDA: under 8 minutes on one modern GPU
    .venv/bin/python benchmarks/gpu_suite.py --smoke    # the same code on the CPU at tiny sizes (~30 s)
    .venv/bin/python benchmarks/gpu_suite.py --json out/gpu_suite.json
    .venv/bin/python benchmarks/gpu_suite.py --calibrate MODEL.pth --dtype fp16   # tiling/cost.py constants

On the CPU, "peak" is the resident-memory peak above the run's start (psutil sampler), not VRAM.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "benchmarks")]

import bench_smoke  # noqa: E402
import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402

from peak_memory import measure_peak  # noqa: E402
from receipt_fields import dtype as receipt_dtype, first_pass, tile_plan  # noqa: E402

WEIGHTS = Path(os.environ.get("DF_SHARED_WEIGHTS", REPO.parent / "shared" / "weights"))
COMFY = Path(os.environ.get("DF_COMFYUI_DIR", REPO / ".venv" / "ComfyUI"))


@dataclass(frozen=True)
class Sizes:
    gan: int  # GAN input side
    gan_repeats: int
    rrdb_blocks: int  # random RRDB when the real file is absent (and always in the smoke run)
    rrdb_nf: int
    sdx4: tuple[int, ...]  # SD x4 input sides
    sdx4_steps: int
    sdx4_widths: tuple[int, int, int, int, int] | None  # unet, vae, groups, context, text width; None: real
    coz: int  # CoZ input side (output 4x)
    coz_real: bool
    warmup: bool = True  # one untimed call first (cuDNN autotuning, lazy init)


FULL = Sizes(gan=1024, gan_repeats=3, rrdb_blocks=23, rrdb_nf=64, sdx4=(512, 1024), sdx4_steps=3,
             sdx4_widths=None, coz=128, coz_real=True)
SMOKE = Sizes(gan=32, gan_repeats=1, rrdb_blocks=2, rrdb_nf=16, sdx4=(32,), sdx4_steps=1,
              sdx4_widths=(8, 8, 8, 64, 64), coz=16, coz_real=False, warmup=False)


@dataclass
class Row:
    section: str
    model: str
    variant: str
    size: str
    seconds: float | None = None
    mps: float | None = None  # output megapixels per second
    peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- measuring

def measure(fn, device: torch.device, repeats: int = 1, warmup: bool = True):
    """(median seconds, peak MiB, last value): after one warm-up call; peak over the timed calls."""
    if warmup:
        fn()  # cuDNN autotuning, lazy init, allocator growth
    times, value, peak = [], None, 0.0
    for _ in range(repeats):
        value = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            value = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            r = measure_peak(fn)
            value = r.value
            times.append(r.seconds)
            peak = max(peak, r.above / 2**20)
    return statistics.median(times), peak, value


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def table(rows: list[Row], device: torch.device) -> str:
    peak = "peak VRAM MiB" if device.type == "cuda" else "peak RSS MiB (CPU)"
    lines = [f"| section | model | variant | size | s | MP/s | {peak} | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.section} | {r.model} | {r.variant} | {r.size} | {fmt(r.seconds, '.3f')} | "
                     f"{fmt(r.mps, '.2f')} | {fmt(r.peak_mib, '.0f')} | {r.note} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- GAN

def rrdb_state_dict(blocks: int, nf: int, gc_: int = 32, seed: int = 0) -> dict:
    """Random weights in the upstream RealESRGAN_x4plus key layout (RRDBNet x4, `blocks` RRDBs)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv_first": (nf, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for i in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{i}"] = (nf if i == 5 else gc_, nf + (i - 1) * gc_)
    shapes.update({k: (nf, nf) for k in ("conv_body", "conv_up1", "conv_up2", "conv_hr")})
    shapes["conv_last"] = (3, nf)
    sd = {}
    for name, (out_c, in_c) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=g) * (0.5 / (in_c * 9) ** 0.5)
        sd[f"{name}.bias"] = torch.zeros(out_c)
    return sd


def gan_models(sizes: Sizes, tmp: Path, smoke: bool) -> list[tuple[str, Path]]:
    from dreamforge_upscale.assets.bundled_model import bundled_model_path

    models = [("Compact", bundled_model_path())]
    x4plus = WEIGHTS / "RealESRGAN_x4plus.pth"
    if x4plus.is_file() and not smoke:
        models.append(("RRDB 23B (RealESRGAN_x4plus)", x4plus))
    else:
        path = tmp / f"rrdb{sizes.rrdb_blocks}.pth"
        torch.save({"params_ema": rrdb_state_dict(sizes.rrdb_blocks, sizes.rrdb_nf)}, path)
        models.append((f"RRDB {sizes.rrdb_blocks}B nf{sizes.rrdb_nf} (random)", path))
    return models


def core_upscaler(device: torch.device):
    """ComfyUI core's ImageUpscaleWithModel, or None when ComfyUI is not importable here."""
    if not (COMFY / "comfy" / "utils.py").exists():
        return None
    sys.path.insert(0, str(COMFY))
    argv = sys.argv
    sys.argv = [argv[0]] + (["--cpu"] if device.type == "cpu" else [])  # comfy parses argv on import
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel
    except Exception as exc:  # noqa: BLE001 - reported in the table, the rest still runs
        print(f"ComfyUI core not importable ({type(exc).__name__}: {exc}); core rows skipped", flush=True)
        return None
    finally:
        sys.argv = argv
    return ImageUpscaleWithModel


def gan_section(sizes: Sizes, device: torch.device, tmp: Path, smoke: bool) -> list[Row]:
    from spandrel import ModelLoader

    from dreamforge_upscale.upscalers import GANUpscaler, upscale

    rows = []
    core = core_upscaler(device)
    torch.manual_seed(0)
    image = torch.rand(1, sizes.gan, sizes.gan, 3)
    out_mp = (4 * sizes.gan) ** 2 / 1e6
    size = f"{sizes.gan}² → {4 * sizes.gan}²"
    for label, path in gan_models(sizes, tmp, smoke):
        plain = ModelLoader().load_from_file(str(path)).eval().to(device)
        variants = {}
        for dt in ("fp32", "fp16", "bf16"):
            try:
                ours = GANUpscaler.load(path, dtype=dt, device=device)
            except Exception as exc:  # noqa: BLE001 - e.g. a dtype the architecture lacks
                rows.append(Row("GAN", label, f"ours {dt}", size, note=f"not run: {exc}"))
                continue
            ours.module().to(device)
            variants[f"ours {dt}"] = (lambda u=ours: upscale(u, image, device=device), ours)
        if device.type == "cuda":  # torch.compile pays (if at all) on a GPU: measured there only
            compiled = GANUpscaler.load(path, dtype="fp16", device=device, compile=True)
            compiled.module().to(device)
            variants["ours fp16 + compile"] = (lambda u=compiled: upscale(u, image, device=device), compiled)
        if core is not None:
            variants["core (fp32)"] = (lambda: core.execute(plain, image)[0], None)
        x = image.permute(0, 3, 1, 2).contiguous().to(device)

        def untiled():
            with torch.inference_mode():
                return plain(x)

        variants["untiled (fp32)"] = (untiled, None)
        for name, (fn, ours) in variants.items():
            try:
                with torch.inference_mode():
                    seconds, peak, value = measure(fn, device, sizes.gan_repeats, sizes.warmup)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory untiled: say so, keep going
                rows.append(Row("GAN", label, name, size, note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            note = ""
            if isinstance(value, tuple):
                plan = tile_plan(value[1])
                note = f"{plan['count']} tile(s) of {plan['tile'][0]} px, dtype {receipt_dtype(value[1])}"
            rows.append(Row("GAN", label, name, size, seconds, out_mp / seconds, peak, note))
            print(f"  GAN {label} {name}: {seconds:.3f} s", flush=True)
            del value
        del plain, variants
        gc.collect()
    return rows


# --------------------------------------------------------------------------------------------- SD x4

def sdx4_model(sizes: Sizes, device: torch.device):
    import tiny_sdx4
    from dreamforge_upscale.upscalers import ModelSource
    from dreamforge_upscale.upscalers.sdx4 import SDX4Upscaler
    from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer

    unet_c, vae_c, groups, context, text = sizes.sdx4_widths or (256, 128, 32, 1024, 1024)
    # tiny_sdx4 reads its widths from module constants: set them to the published ones for a real-size build
    tiny_sdx4.CONTEXT_DIM, tiny_sdx4.TEXT_WIDTH = context, text
    tiny_sdx4.TEXT_LAYERS = 23 if sizes.sdx4_widths is None else 2
    with torch.device(device):  # random init where it runs: seconds on a GPU instead of minutes on the CPU
        unet, vae, text_encoder = tiny_sdx4.build_components(0, unet_c, vae_c, groups)
    comps = SDX4Components(unet, vae, text_encoder, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir()))
    unet_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return SDX4Upscaler(comps, ModelSource("random SD x4 (published widths)" if sizes.sdx4_widths is None
                                           else "tiny random SD x4", None, "SD x4"), dtype=unet_dtype)


def sdx4_section(sizes: Sizes, device: torch.device, vram_budget: int | None) -> list[Row]:
    from dreamforge_upscale.tiling import RunHooks
    from dreamforge_upscale.upscalers import UpscaleRequest, upscale
    from dreamforge_upscale.upscalers.sdx4 import SDX4Options

    rows = []
    model = sdx4_model(sizes, device)
    params = sum(p.numel() for p in model.comps.unet.parameters()) / 1e6
    label = f"SD x4 UNet {params:.0f} M params, {str(model.dtype).replace('torch.', '')}"
    opts = SDX4Options(steps=sizes.sdx4_steps)
    hooks = RunHooks(free_bytes=(lambda d: vram_budget) if vram_budget and device.type == "cuda" else None)
    for side in sizes.sdx4:
        torch.manual_seed(0)
        image = torch.rand(1, side, side, 3)
        size = f"{side}² → {4 * side}²"
        try:
            seconds, peak, (out, receipt) = measure(
                lambda: upscale(model, image, UpscaleRequest(options=opts, seed=0), hooks=hooks, device=device), device, 1,
                sizes.warmup)
        except Exception as exc:  # noqa: BLE001 - reported
            rows.append(Row("SD x4", label, f"{sizes.sdx4_steps} steps", size, note=f"failed: {str(exc)[:100]}"))
            continue
        plan = first_pass(receipt)["backend"]
        note = (f"UNet tiles {plan['unet_tiles']['count']}, VAE tiles {plan['vae_tiles']['count']}, "
                f"{seconds / sizes.sdx4_steps:.2f} s/step incl. decode")
        rows.append(Row("SD x4", label, f"{sizes.sdx4_steps} steps", size, seconds, (4 * side) ** 2 / 1e6 / seconds,
                        peak, note))
        print(f"  SD x4 {size}: {seconds:.2f} s", flush=True)
        del out
    del model
    gc.collect()
    return rows


# -------------------------------------------------------------------------------------------- CoZ SD3

def coz_model(sizes: Sizes, device: torch.device):
    import tiny_sd3
    from dreamforge_upscale.upscalers import ModelSource
    from dreamforge_upscale.upscalers.coz_sd3 import CoZSD3Upscaler
    from dreamforge_upscale.upscalers.coz_sd3.backend import select_dtypes
    from dreamforge_upscale.upscalers.coz_sd3.components import CoZComponents, clip_tokenizer

    if sizes.coz_real:  # SD3 medium's widths (tiny_sd3 reads them from module constants)
        tiny_sd3.LAYERS, tiny_sd3.WIDTH = 24, 64 * 24
        tiny_sd3.CLIP_L, tiny_sd3.CLIP_G, tiny_sd3.JOINT, tiny_sd3.POS_MAX = 768, 1280, 4096, 192
        tiny_sd3.VAE_CHANNELS = (128, 256, 512, 512)
    with torch.device(device):
        c = tiny_sd3.build_components(0)
    tokenizers = {"clip_l": clip_tokenizer(tiny_sd3.clip_tokenizer_dir(), "clip_l"),
                  "clip_g": clip_tokenizer(tiny_sd3.clip_tokenizer_dir(), "clip_g"), "t5": None}
    comps = CoZComponents(c["transformer"], c["vae"], c["clip_l"], c["clip_g"], None, tokenizers, [])
    main, vae, text = select_dtypes("auto", device)
    return CoZSD3Upscaler(comps, ModelSource("random SD3 (CoZ)", None, "CoZ SD3"), [], main, vae, text)


def coz_section(sizes: Sizes, device: torch.device) -> list[Row]:
    from dreamforge_upscale.upscalers import UpscaleRequest, upscale

    model = coz_model(sizes, device)
    params = sum(p.numel() for p in model.comps.transformer.parameters()) / 1e6
    label = f"CoZ SD3 transformer {params:.0f} M params, {str(model.dtype).replace('torch.', '')}"
    torch.manual_seed(0)
    image = torch.rand(1, sizes.coz, sizes.coz, 3)
    size = f"{sizes.coz}² → {4 * sizes.coz}²"
    try:
        seconds, peak, (out, receipt) = measure(lambda: upscale(model, image,
                                                                UpscaleRequest(prompt="a photo", seed=0),
                                                                device=device), device, 1, sizes.warmup)
    except Exception as exc:  # noqa: BLE001 - reported
        return [Row("CoZ SD3", label, "1 step", size, note=f"failed: {str(exc)[:100]}")]
    print(f"  CoZ {size}: {seconds:.2f} s", flush=True)
    return [Row("CoZ SD3", label, "1 step", size, seconds, (4 * sizes.coz) ** 2 / 1e6 / seconds, peak,
                "no T5 (zeros); text encoders 2 layers")]


# ---------------------------------------------------------------------------------------------- main

def run(smoke: bool, sections: tuple[str, ...], vram_gb: float) -> tuple[list[Row], torch.device]:
    import tempfile

    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU code path, or on a machine with a GPU")
    sizes = SMOKE if smoke else FULL
    if smoke:
        torch.set_num_threads(1)  # tiny tensors: thread wake-ups would dominate on a shared CPU
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        if "gan" in sections:
            rows += gan_section(sizes, device, Path(tmp), smoke)
        if "sdx4" in sections:
            rows += sdx4_section(sizes, device, int(vram_gb * 2**30))
        if "coz" in sections:
            rows += coz_section(sizes, device)
    return rows, device


def calibrate(model: Path, dtype: str) -> None:
    """Print the cost-model line (tiling/cost.py) for one GAN model on this machine's device."""
    from dreamforge_upscale.tiling.cost import calibrate as fit
    from dreamforge_upscale.upscalers import GANUpscaler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if bench_smoke.smoke() and device.type == "cpu" and dtype == "fp16":  # a CUDA dtype: the CPU fit in fp32
        print("(smoke run on the CPU: fp16 is a CUDA dtype, fitting fp32 instead)")
        dtype = "fp32"
    up = GANUpscaler.load(model, dtype=dtype, device=device)
    up.module().to(device)
    # smoke (DREAMFORGE_BENCH_SMOKE=1): the same fit on tiny windows, one call each
    sides, repeats = ((16, 32), 1) if bench_smoke.smoke() else ((96, 192, 384), 2)
    bench_smoke.limit_threads()
    # the bare model call (the typed contract's upscale_window wraps it in a WindowResult)
    cost = fit(getattr(up, "forward", up.upscale_window), device, up.dtype, sides=sides, repeats=repeats,
               channels=up.capabilities.in_channels)
    table = "CUDA_COSTS" if device.type == "cuda" else "CPU_COSTS"
    print(f'{table}: "{up.descriptor.architecture.id}": ArchCost(per_call={cost.per_call:.3g}, '
          f'per_pixel={cost.per_pixel:.3g}),')


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="GPU speed/memory suite (GAN, SD x4, CoZ SD3) in one table")
    ap.add_argument("--calibrate", type=Path, metavar="MODEL", help="only fit the tile cost model for MODEL")
    ap.add_argument("--dtype", default="fp32", help="dtype for --calibrate")
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes")
    ap.add_argument("--sections", default="gan,sdx4,coz")
    ap.add_argument("--vram-gb", type=float, default=12.0, help="SD x4 plans within this much free VRAM")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.calibrate:
        calibrate(args.calibrate, args.dtype)
        return
    args.smoke = args.smoke or bench_smoke.smoke()  # DREAMFORGE_BENCH_SMOKE=1: the --smoke run
    started = time.perf_counter()
    rows, device = run(args.smoke, tuple(s.strip() for s in args.sections.split(",")), args.vram_gb)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"\n### DreamForge GPU suite on {name}, torch {torch.__version__}"
          f"{' (smoke: tiny sizes, numbers mean nothing)' if args.smoke else ''}\n")
    print(table(rows, device))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json = bench_smoke.out_path(args.json)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
