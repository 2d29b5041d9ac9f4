#!/usr/bin/env python
"""Benchmark Chain-of-Zoom: the loop's own overhead, and full-image x16 against two chained 4x passes.

Cases (pick with --cases):

* loop   -- a 4-step recursive_multiscale loop (bundled Compact x4, process size 512) with a prompt
            model (a tiny random Qwen2-VL built offline, tests/tiny_vlm.py: real transformers
            generate calls, 8 new tokens). The same work is then timed piece by piece: the four SR
            calls (upscale() on the same crops) and the four prompt calls (describe() on the same
            images), plus the four colour fixes when the loop runs one. Ratio = loop / sum of parts;
            the target is <= 1.1 (the loop itself adds almost nothing). Medians of the repeats (the CPU
            is shared). in_loop_ratio divides each loop's time by the SR seconds in its own receipts
            plus its own prompt-call seconds (no run-to-run noise; with color_fix none that ratio is
            the loop's plumbing alone).
* full16 -- full-image Chain-of-Zoom at scale 16 on a 256x256 photo with the Compact model (two 4x
            passes, colour fix per pass) vs plain upscale() at scale 16 (two chained 4x GAN passes,
            nothing else). Seconds and peak resident memory above the loaded model and input, one
            fresh subprocess per variant.

Usage:
    .venv/bin/python benchmarks/bench_zoom.py                       # both cases (~3-5 min on 2 cores)
    .venv/bin/python benchmarks/bench_zoom.py --quick               # small sizes, smoke run
    .venv/bin/python benchmarks/bench_zoom.py --cases loop --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import measure_peak  # benchmarks/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # pack_import, tiny_vlm
sys.path.insert(0, str(REPO / "scripts"))  # bench_smoke

import bench_smoke  # noqa: E402
from receipt_fields import as_dict  # noqa: E402

FULL = {"loop": (512, 3), "full16": (256, 1)}  # (size, repeats)
QUICK = {"loop": (128, 2), "full16": (64, 1)}
SMOKE = {"loop": (32, 1), "full16": (16, 1)}  # DREAMFORGE_BENCH_SMOKE=1: the code path only
TARGET_LOOP_RATIO = 1.1


def setup() -> None:
    import pack_import

    pack_import.install()


def photo(size: int):
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


# ----------------------------------------------------------------------------------------- loop
class TimedProvider:
    """Wraps a prompt provider and adds up the seconds its describe() calls take."""

    def __init__(self, provider):
        self.provider, self.name, self.seconds = provider, provider.name, 0.0

    def describe(self, images, instruction, **kwargs):
        started = time.perf_counter()
        try:
            return self.provider.describe(images, instruction, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def bench_loop(size: int, repeats: int) -> dict:
    import torch
    from PIL import Image

    from dreamforge_upscale.upscalers import GANUpscaler, UpscaleRequest, upscale
    from dreamforge_upscale.assets.bundled_model import bundled_model_path
    from dreamforge_upscale.imaging.color_fix import color_fix
    from dreamforge_upscale.zoom import ZoomSettings, from_pil, zoom_loop
    from dreamforge_upscale.zoom.geometry import centre_box
    from dreamforge_upscale.zoom.prompts import TWO_IMAGE_INSTRUCTION
    from dreamforge_upscale.zoom.vlm import VLMPromptProvider
    from tiny_vlm import save_tiny_vlm

    compact = GANUpscaler.load(bundled_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        vlm = VLMPromptProvider.load(save_tiny_vlm(Path(tmp) / "tiny-qwen2-vl"), max_new_tokens=8)
    image = photo(600)  # prepared to `size` by the loop
    steps = 4
    box = centre_box(size, size, 4)
    timed = TimedProvider(vlm)
    results = {}
    for fix in ("none", "wavelet"):
        settings = ZoomSettings(mode="recursive_multiscale", process_size=size, provider=timed, color_fix=fix,
                                user_prompt="astronaut")
        zoom_loop(compact, image, 1, settings)  # warm-up (threads, allocator)
        loops, parts, breakdown, in_loop = [], [], [], []
        for _ in range(repeats):
            timed.seconds = 0.0
            started = time.perf_counter()
            result = zoom_loop(compact, image, steps, settings)
            loops.append(time.perf_counter() - started)
            # the same run's own SR + prompt time (receipts, timed provider): no run-to-run noise
            in_loop.append(sum(r["upscale"]["seconds"] for r in as_dict(result.receipt)["step_receipts"])
                           + timed.seconds)
            states = result.states[0]
            sr = prompt = fixing = 0.0
            for n in range(1, steps + 1):
                crop = states[n - 1].crop(box)
                view = crop.resize((size, size), Image.Resampling.BICUBIC)
                t = time.perf_counter()
                vlm.describe([states[n - 1], view], TWO_IMAGE_INSTRUCTION, seed=n)
                prompt += time.perf_counter() - t
                t = time.perf_counter()
                out, _ = upscale(compact, from_pil(crop), UpscaleRequest(prompt="p", seed=n))
                sr += time.perf_counter() - t
                if fix != "none":
                    t = time.perf_counter()
                    color_fix(out, from_pil(view), fix)
                    fixing += time.perf_counter() - t
            parts.append(sr + prompt + fixing)
            breakdown.append({"sr": sr, "prompt": prompt, "color_fix": fixing})
        loop_s, parts_s = statistics.median(loops), statistics.median(parts)
        results[fix] = {
            "loop_seconds": round(loop_s, 3), "parts_seconds": round(parts_s, 3),
            "ratio": round(loop_s / parts_s, 3),
            "in_loop_ratio": round(statistics.median(t / a for t, a in zip(loops, in_loop)), 3),
            "sr_seconds": round(statistics.median(b["sr"] for b in breakdown), 3),
            "prompt_seconds": round(statistics.median(b["prompt"] for b in breakdown), 3),
            "color_fix_seconds": round(statistics.median(b["color_fix"] for b in breakdown), 3),
            "loops": [round(x, 3) for x in loops], "parts": [round(x, 3) for x in parts],
        }
    return {"case": "loop", "process_size": size, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "results": results, "target_ratio": TARGET_LOOP_RATIO}


# ----------------------------------------------------------------------------------------- full16
def full16_worker(variant: str, size: int) -> dict:
    import torch

    from dreamforge_upscale.upscalers import GANUpscaler, UpscaleRequest, upscale
    from dreamforge_upscale.assets.bundled_model import bundled_model_path
    from dreamforge_upscale.zoom import zoom_upscale

    compact = GANUpscaler.load(bundled_model_path())
    image = photo(size)
    upscale(compact, torch.rand(1, 8, 8, 3))  # warm up threads and the allocator
    def run():
        if variant == "chained_gan":
            return upscale(compact, image, UpscaleRequest(scale=16.0))
        return zoom_upscale(compact, image, 16.0, color_fix="none" if variant == "coz_nofix" else "wavelet")

    measured = measure_peak(run, interval=0.01)
    out, receipt = measured.value
    passes, seconds = as_dict(receipt)["pass_count"], measured.seconds
    return {"variant": variant, "size": size, "output": list(out.shape[1:3]), "passes": passes,
            "seconds": round(seconds, 2), "peak_above_baseline_mb": round(measured.above / 2**20, 1),
            "output_mb": round(out.numel() * 4 / 2**20, 1)}


def bench_full16(size: int, threads: int = 0) -> dict:
    rows = []
    variants = ("chained_gan", "coz_nofix", "coz")
    # one fresh process per variant; a smoke run starts one for all three (the same worker, imports paid once)
    groups = [variants] if bench_smoke.smoke() else [(v,) for v in variants]
    for group in groups:
        proc = subprocess.run([sys.executable, __file__, "--worker", ",".join(group), "--size", str(size),
                               "--threads", str(threads)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{','.join(group)} failed:\n{proc.stderr[-3000:]}")
        rows += [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(group):]]
    return {"case": "full16", "input": [size, size], "scale": 16, "rows": rows}


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="loop,full16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        for variant in args.worker.split(","):
            print(json.dumps(full16_worker(variant, args.size)), flush=True)
        return
    sizes = SMOKE if bench_smoke.smoke() else QUICK if args.quick else FULL
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "cases": []}
    for case in args.cases.split(","):
        size, repeats = sizes[case]
        result = bench_loop(size, repeats) if case == "loop" else bench_full16(size, args.threads)
        report["cases"].append(result)
        print(json.dumps(result, indent=1), flush=True)
    if bench_smoke.smoke():
        print(bench_smoke.note())
    if args.json:
        bench_smoke.out_path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
