#!/usr/bin/env python
"""Benchmark the SD x4 path (tiny random components, CPU): tiling overhead and peak memory vs size.

Real weights are not available here, so the components are the published architecture at small
widths (tests/tiny_sdx4.py). ComfyUI core has no tiled sampling for this model (and its model
detection only accepts the full-width UNet), so the reference is our own untiled pass.

* overhead -- a 384x384 photo: denoising untiled vs 2x2 latent tiles with the default overlap (32),
              decoding untiled vs the default tiled decode (windows <= 256 latent px, shared GroupNorm
              statistics); interleaved repeats, medians.
* memory   -- narrow components (8 base channels), one step, inputs 256 -> 512 -> 1024 with the host
              reporting 1.5 GB free (auto tiling plans within it): peak resident memory above the
              baseline, one fresh subprocess per size, against the float32 output canvas.

* --decode -- the real-size SD x4 VAE (published config, random weights) on one latent: untiled vs tiled
              in one pass with exact GroupNorm sums (middle attention over the whole latent, or windowed)
              vs the statistics pass; time ratios and max |tiled - untiled|. Exit 0 only when the exact
              one-pass decode is within 1e-4 of the untiled one and takes <= 1.15x its time.

    .venv/bin/python benchmarks/bench_sdx4.py             # ~6 min on 2 idle cores
    .venv/bin/python benchmarks/bench_sdx4.py --quick     # small sizes, smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "benchmarks")]

import bench_smoke  # noqa: E402

MEMORY_CHILD = r'''
import json, sys
sys.path[:0] = sys.argv[1:4]
import pack_import; pack_import.install()
import numpy as np, torch
import bench_smoke; bench_smoke.limit_threads()
from PIL import Image
from skimage import data
import tiny_sdx4
from peak_memory import measure_peak, trim_heap
from dreamforge_upscale.tiling import RunHooks
from dreamforge_upscale.upscalers import UpscaleRequest, upscale
from dreamforge_upscale.upscalers.contract import ModelSource
from dreamforge_upscale.upscalers.sdx4 import SDX4Options, SDX4Upscaler
from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer
from receipt_fields import first_pass
size, budget = int(sys.argv[4]), int(sys.argv[5])
unet, vae, text = tiny_sdx4.build_components(0, unet_channels=8, vae_channels=8, groups=8)
model = SDX4Upscaler(SDX4Components(unet, vae, text, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir())),
                     ModelSource("tiny", None, "bench"))
photo = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
image = torch.from_numpy(np.asarray(photo).copy()).float().div(255)[None]
opts = SDX4Options(steps=1)
upscale(model, image[:, :32, :32], UpscaleRequest(options=opts, seed=0))
trim_heap()
r = measure_peak(lambda: upscale(model, image, UpscaleRequest(options=opts, seed=0),
                                 hooks=RunHooks(free_bytes=lambda d: budget)))
out, receipt = r.value
plan = first_pass(receipt)["backend"]
print(json.dumps({"size": size, "seconds": r.seconds, "peak_above": r.above, "canvas": out.numel() * 4,
                  "unet_tiles": plan["unet_tiles"]["count"], "vae_tiles": plan["vae_tiles"]["count"]}))
'''


def photo(size: int):
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).float().div(255).permute(2, 0, 1)[None]


def overhead(size: int, repeats: int, steps: int, narrow: bool = False) -> dict:
    import pack_import

    pack_import.install()
    import torch

    import tiny_sdx4
    from dreamforge_upscale.tiling import RunHooks
    from dreamforge_upscale.tiling.latent_denoise import plan_latent
    from dreamforge_upscale.upscalers.contract import ModelSource
    from dreamforge_upscale.upscalers.sdx4 import SDX4Options, SDX4Upscaler, sampler
    from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer

    widths = dict(unet_channels=8, vae_channels=8, groups=8) if narrow else {}
    unet, vae, text = tiny_sdx4.build_components(0, **widths)
    model = SDX4Upscaler(SDX4Components(unet, vae, text, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir())),
                         ModelSource("tiny", None, "bench"))
    x = photo(size)
    tile = (size + 32) // 2 + (16 if size > 64 else 0)  # 2x2 latent tiles with the default overlap (32)
    hooks = RunHooks()
    with torch.inference_mode():
        embeds = sampler.encode_prompt(model.comps, "a photo", "", 1, True, x.device)
        lat, _ = sampler.denoise(model.comps, x, embeds, SDX4Options(steps=1), 0, x.device, torch.float32, hooks)
    variants = {
        "denoise_untiled": lambda: sampler.denoise(model.comps, x, embeds, SDX4Options(steps=steps, tile=0), 0,
                                                   x.device, torch.float32, hooks),
        "denoise_tiled": lambda: sampler.denoise(model.comps, x, embeds, SDX4Options(steps=steps, tile=tile), 0,
                                                 x.device, torch.float32, hooks),
        "decode_untiled": lambda: sampler.decode(model.comps, lat, SDX4Options(vae_tile=size), x.device,
                                                 torch.float32, hooks),
        "decode_tiled": lambda: sampler.decode(model.comps, lat, SDX4Options(), x.device, torch.float32, hooks),
    }
    for fn in variants.values():  # warm-up: threads, allocator, first-call initialisation
        with torch.inference_mode():
            fn()
    times = {k: [] for k in variants}
    for r in range(repeats):
        order = list(variants)[r % 4:] + list(variants)[:r % 4]
        for name in order:
            start = time.perf_counter()
            with torch.inference_mode():
                variants[name]()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    _, report = sampler.decode(model.comps, lat, SDX4Options(), x.device, torch.float32, hooks)
    return {
        "size": size, "steps": steps, "latent_tiles": plan_latent(size, size, tile, 32).count,
        "vae_tiles": report["vae_tiles"]["count"], "seconds": med,
        "denoise_ratio": med["denoise_tiled"] / med["denoise_untiled"],
        "decode_ratio": med["decode_tiled"] / med["decode_untiled"],
        "total_ratio": (med["denoise_tiled"] + med["decode_tiled"]) / (med["denoise_untiled"] + med["decode_untiled"]),
    }


DECODE_GOALS = {"max_diff": 1e-4, "time_ratio": 1.15}


def real_size_vae(narrow: bool):
    """The SD x4 upscaler's VAE at the published config (x4-upscaling.yaml first_stage_config), random weights."""
    import torch
    from diffusers import AutoencoderKL

    width, groups = (8, 8) if narrow else (128, 32)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=groups,
                        block_out_channels=(width, 2 * width, 4 * width),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        scaling_factor=0.08333)
    return vae.eval().requires_grad_(False)


def decode_comparison(latent: int, repeats: int, narrow: bool, parked: str = "device") -> dict:
    import pack_import

    pack_import.install()
    import torch

    import dataclasses

    from dreamforge_upscale.tiling.exact_decode import plan_exact
    from dreamforge_upscale.tiling.vae_tiles import decode_tiled
    from dreamforge_upscale.upscalers.sdx4.sampler import VAE_OVERLAP, VAE_PAD, _to_unit
    from dreamforge_upscale.upscalers.vae_program import vae_decoder_program

    vae = real_size_vae(narrow)
    torch.manual_seed(1)
    z = torch.nn.functional.interpolate(torch.randn(1, 4, latent // 8, latent // 8), size=(latent, latent),
                                        mode="bicubic") * 2
    cpu = torch.device("cpu")
    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    tile = (latent + VAE_OVERLAP) // 2 + 1  # 2 x 2 windows: the fewest a tiled decode has
    def run(w):
        return _to_unit(vae.decode(w, return_dict=False)[0])

    # planned with memory to spare (the windows wait on the device); parked where --parked says
    exact, refused = plan_exact(lambda: vae_decoder_program(vae, _to_unit), run, z, tile, VAE_PAD, 1.0,
                                float(2**50), cpu, torch.float32)
    if exact is None:
        raise SystemExit(f"no exact plan: {refused}")
    exact = dataclasses.replace(exact, parked=parked, whole_attention=True)

    def tiled(**kw):
        return decode_tiled(run, norms, z, scale=4, tile=tile, overlap=VAE_OVERLAP, pad=VAE_PAD, device=cpu,
                            dtype=torch.float32, **kw)

    variants = {"untiled": lambda: run(z).permute(0, 2, 3, 1),
                "one_pass_exact": lambda: tiled(exact=exact),
                "one_pass_windowed": lambda: tiled(exact=dataclasses.replace(exact, whole_attention=False)),
                "statistics_pass": lambda: tiled()}
    outputs, times = {}, {k: [] for k in variants}
    with torch.inference_mode():
        run(z[..., :16, :16])  # warm-up
        for r in range(repeats):
            order = list(variants)[r % 4:] + list(variants)[:r % 4]
            for name in order:
                start = time.perf_counter()
                out = variants[name]()
                times[name].append(time.perf_counter() - start)
                outputs[name] = out if name == "untiled" else out.image
                if name != "untiled":
                    plan, stats = out.plan.describe(), out.statistics
    med = {k: statistics.median(v) for k, v in times.items()}
    whole = outputs["untiled"]
    diffs = {k: (v - whole).abs().max().item() for k, v in outputs.items() if k != "untiled"}
    means = {k: (v - whole).abs().mean().item() for k, v in outputs.items() if k != "untiled"}
    ratios = {k: med[k] / med["untiled"] for k in med if k != "untiled"}
    return {"latent": latent, "output": 4 * latent, "repeats": repeats, "plan": plan, "statistics": stats,
            "parked": parked,
            "seconds": med, "time_ratio": ratios, "max_diff": diffs, "mean_diff": means,
            "goals_met": diffs["one_pass_exact"] <= DECODE_GOALS["max_diff"]
            and ratios["one_pass_exact"] <= DECODE_GOALS["time_ratio"]}


def print_decode(d: dict, narrow: bool) -> None:
    p = d["plan"]
    print(f"\nSD x4 VAE decode, {'narrow test' if narrow else 'real-size (published config, random weights)'} VAE, "
          f"latent {d['latent']}² -> {d['output']}², {p['count']} windows of {p['window'][0]}² (pad {p['context']}), "
          f"one pass parked on {d['parked']}, medians of {d['repeats']}")
    print("| variant | seconds | / untiled | max abs diff | mean abs diff |")
    print("|---|---|---|---|---|")
    print(f"| untiled | {d['seconds']['untiled']:.2f} | 1.00x | - | - |")
    for k in ("one_pass_exact", "one_pass_windowed", "statistics_pass"):
        print(f"| {k.replace('_', ' ')} | {d['seconds'][k]:.2f} | {d['time_ratio'][k]:.2f}x | {d['max_diff'][k]:.2e} | "
              f"{d['mean_diff'][k]:.2e} |")
    verdict = "goals met" if d["goals_met"] else "goals NOT met"
    print(f"decode: time ratio {d['time_ratio']['one_pass_exact']:.2f}x (goal <= {DECODE_GOALS['time_ratio']}), max diff "
          f"{d['max_diff']['one_pass_exact']:.2e} (goal <= {DECODE_GOALS['max_diff']:.0e}): {verdict}")


def memory(size: int, budget: int) -> dict:
    args = [sys.executable, "-c", MEMORY_CHILD, str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "benchmarks"),
            str(size), str(budget)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decode", action="store_true", help="the real-size VAE decode comparison only")
    ap.add_argument("--latent", type=int, default=128, help="--decode: latent side (output = 4x)")
    ap.add_argument("--repeats", type=int, default=2, help="--decode: interleaved repeats (medians)")
    ap.add_argument("--parked", choices=("device", "cpu", "disk"), default="device",
                    help="--decode: where the one pass's windows wait between GroupNorms")
    args = ap.parse_args()
    if args.decode:
        narrow = bench_smoke.smoke()
        bench_smoke.limit_threads()
        d = decode_comparison(bench_smoke.capped(args.latent, 96), bench_smoke.capped(args.repeats, 1), narrow,
                              args.parked)
        print_decode(d, narrow)
        if narrow:
            print(bench_smoke.note())
        if args.json:
            path = bench_smoke.out_path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(d, indent=1))
        sys.exit(0 if d["goals_met"] or narrow else 1)
    size, repeats, steps = (128, 1, 2) if args.quick else (384, 3, 4)
    sizes = (128, 256) if args.quick else (256, 512, 1024)
    narrow = bench_smoke.smoke()  # the code path only: narrow components, one step, 48 px in 2x2 tiles, one child
    if narrow:
        size, repeats, steps, sizes = 48, 1, 1, (32,)
    bench_smoke.limit_threads()
    budget = 1536 * 2**20
    o = overhead(size, repeats, steps, narrow)
    mem = [memory(s, budget) for s in sizes]
    print(f"\nSD x4 tiling overhead, tiny model, {o['size']}x{o['size']} input, {o['steps']} steps (medians of {repeats})")
    print("| stage | untiled s | tiled s | tiled / untiled | target |")
    print("|---|---|---|---|---|")
    s = o["seconds"]
    print(f"| denoise ({o['latent_tiles']} latent tiles, overlap 32) | {s['denoise_untiled']:.2f} | "
          f"{s['denoise_tiled']:.2f} | {o['denoise_ratio']:.2f}x | <= 1.25x |")
    print(f"| decode ({o['vae_tiles']} tiles, pad 16, shared GroupNorm stats) | {s['decode_untiled']:.2f} | "
          f"{s['decode_tiled']:.2f} | {o['decode_ratio']:.2f}x | |")
    print(f"| both | | | {o['total_ratio']:.2f}x | |")
    print(f"\nSD x4 peak memory vs input size (narrow tiny model, 1 step, host reports {budget >> 20} MB free)")
    print("| input | output | unet tiles | vae tiles | seconds | peak above baseline MB | canvas MB | peak growth "
          "| canvas growth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prev, m in zip([None] + mem, mem):
        growth = f"{m['peak_above'] / prev['peak_above']:.2f}x" if prev else "-"
        canvas = f"{m['canvas'] / prev['canvas']:.2f}x" if prev else "-"
        print(f"| {m['size']}² | {4 * m['size']}² | {m['unet_tiles']} | {m['vae_tiles']} | {m['seconds']:.1f} | "
              f"{m['peak_above'] / 2**20:.0f} | {m['canvas'] / 2**20:.0f} | {growth} | {canvas} |")
    if narrow:
        print(bench_smoke.note())
    if args.json:
        path = bench_smoke.out_path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"overhead": o, "memory": mem}, indent=1))


if __name__ == "__main__":
    main()
