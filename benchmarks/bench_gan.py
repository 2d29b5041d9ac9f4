#!/usr/bin/env python
"""Benchmark the GAN path against ComfyUI core's "Upscale Image (using Model)" and an untiled pass.

Three ways of running the same spandrel model on the same real photo (scikit-image, offline):

* untiled -- the descriptor called once on the whole NCHW-contiguous image (what a plain user does);
* core    -- ComfyUI core's own ImageUpscaleWithModel node (comfy_extras/nodes_upscale_model.py,
             i.e. comfy.utils.tiled_scale with 512 px tiles, 32 px overlap), run under
             torch.inference_mode() as ComfyUI's executor does;
* ours    -- dreamforge_upscale.upscalers.upscale() with default settings (tile=0: auto).

Cases (pick with --cases):

* compact -- realesr-animevideov3 on a 1000x1000 centre crop of skimage.data.retina(): speed
             (interleaved repeats), fidelity with forced 256 px tiles, seam check;
* x4plus  -- RealESRGAN_x4plus on a 600x600 crop: the same, one repeat;
* bf16    -- Compact on a 256x256 crop: ours in bf16 vs core in fp32 (speed, deviation);
* memory  -- Compact on retina resized to 2048x2048: peak resident memory above the loaded model
             and input, one fresh subprocess per variant, against the float32 output canvas.
* unseen  -- photos and models nothing was tuned on, each case in its own process (UNSEEN: astronaut,
             hubble_deep_field, motorcycle, immunohistochemistry, coffee, rocket x Compact bundled /
             shared, RRDB 6 blocks random, RRDB 23B):
             untiled / core / ours / ours with DREAMFORGE_CPU_MALLOC=0, interleaved; seconds, peak RSS,
             RSS after the call, ours/core and ours/untiled (targets 0.8x, 0.75x), max deviation.

Timings on a shared CPU are noisy: variants are interleaved (the order rotates every repeat) and
the ratios are taken from medians. Usage:

    .venv/bin/python benchmarks/bench_gan.py                     # full run (~1 h on 2 idle cores, 45 min of it unseen)
    .venv/bin/python benchmarks/bench_gan.py --quick             # small sizes, smoke run
    .venv/bin/python benchmarks/bench_gan.py --cases compact,memory --json out.json
    .venv/bin/python benchmarks/bench_gan.py --cases unseen --unseen astronaut,hubble   # some unseen cases
    .venv/bin/python benchmarks/bench_gan.py --cases unseen --unseen motorcycle --crop motorcycle=256   # a crop

Receipts are read through receipt_fields.py, so the script also runs on checkouts with dict receipts.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import measure_peak  # benchmarks/ is on sys.path when this script runs
from receipt_fields import dtype as receipt_dtype, tile_plan

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # pack_import, bench_smoke
import bench_smoke  # noqa: E402
PACKAGE = "dreamforge_upscale"
ALL_CASES = ("compact", "x4plus", "bf16", "memory", "unseen")
COMPACT = "realesr-animevideov3.pth"
X4PLUS = "RealESRGAN_x4plus.pth"

# (size, repeats) per case; sizes are input pixels per side.
FULL = {"compact": (1000, 3), "x4plus": (600, 1), "bf16": (256, 3), "memory": (2048, 1), "unseen": (0, 3)}
QUICK = {"compact": (352, 2), "x4plus": (96, 1), "bf16": (96, 2), "memory": (384, 1), "unseen": (64, 1)}
# DREAMFORGE_BENCH_SMOKE=1 (scripts/bench_smoke.py): every case's code path at tiny sizes, one repeat, the
# memory variants in one subprocess and the unseen cases in one (numbers mean nothing)
SMOKE = {"compact": (64, 1), "x4plus": (24, 1), "bf16": (24, 1), "memory": (32, 1), "unseen": (24, 1)}
# Photos and models the pack was never tuned on: (case, skimage photo, model, untiled-size note).
# "bundled" = the Compact file shipped in assets/bundled; "rrdb6" = an RRDB x4 with 6 blocks built here
# with random weights (RealESRGAN_x4plus_anime_6B's shape); sizes are the photos' own.
UNSEEN = (
    ("astronaut 512² / Compact (bundled)", "astronaut", "bundled"),
    ("hubble 872×1000 / Compact (shared weights)", "hubble_deep_field", COMPACT),
    ("motorcycle 741×500 / RRDB 6B (random)", "stereo_motorcycle", "rrdb6"),
    ("immunohistochemistry 512² / RRDB 23B (x4plus)", "immunohistochemistry", X4PLUS),
    ("coffee 600×400 / Compact (shared weights)", "coffee", COMPACT),
    ("rocket 640×427 / Compact (bundled)", "rocket", "bundled"),
)
UNSEEN_TARGETS = {"ours_core": 0.8, "ours_untiled": 0.75}
FIDELITY_TILE = 32 if bench_smoke.smoke() else 256  # smoke: still a forced multi-tile plan on the tiny input
MEMORY_VARIANTS = ("ours_tiled", "ours_auto", "core", "untiled")

TARGETS = {
    "speed_vs_core": 0.8,  # ours / core time
    "speed_vs_untiled": 1.0,  # ours / untiled time
    "max_dev_compact": 1.0,  # /255, ours tiled vs untiled
    "max_dev_x4plus": 3.0,
    "bf16_speedup": 2.5,  # core fp32 time / ours bf16 time
    "bf16_mean_dev": 1.0,  # /255
    "memory_ratio": 1.6,  # peak RSS above model+input / float32 canvas
}
REUSE_ENV = "DREAMFORGE_CPU_MALLOC"
SEAM_EXCESS = 0.1  # /255: overlaps may deviate more than interiors by at most a tenth of an 8-bit step


# ----------------------------------------------------------------------------------------- setup

def default_weights() -> Path:
    return Path(os.environ.get("DF_SHARED_WEIGHTS", REPO.parent / "shared" / "weights"))


def default_comfy() -> Path:
    return Path(os.environ.get("DF_COMFYUI_DIR", REPO / ".venv" / "ComfyUI"))


def setup_imports(comfy_dir: Path | None) -> None:
    """Make the pack's backends importable as `dreamforge_upscale` and, if asked, ComfyUI core."""
    sys.path.insert(0, str(REPO / "scripts"))
    import pack_import

    pack_import.install(PACKAGE)
    if comfy_dir is not None:
        if not (comfy_dir / "comfy" / "utils.py").exists():
            raise SystemExit(f"ComfyUI not found at {comfy_dir} (set --comfy or DF_COMFYUI_DIR)")
        sys.path.insert(0, str(comfy_dir))
        argv = sys.argv
        sys.argv = [argv[0], "--cpu"]  # comfy parses the command line on import: keep it on the CPU
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.utils  # noqa: F401
            from comfy_extras import nodes_upscale_model  # noqa: F401
        finally:
            sys.argv = argv


def core_node():
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    return ImageUpscaleWithModel


# ------------------------------------------------------------------------------------ the inputs

def photo(size: int):
    """Centre crop (or Lanczos resize, when larger than the photo) of skimage's retina, B,H,W,C float32."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    arr = skimage.data.retina()  # 1411 x 1411 RGB fundus photograph
    h, w = arr.shape[:2]
    if size <= min(h, w):
        top, left = (h - size) // 2, (w - size) // 2
        arr = arr[top : top + size, left : left + size]
    else:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)[None]


def load_baseline(path: Path):
    """The model as core's loader / a plain user has it: spandrel descriptor, fp32, eval."""
    from spandrel import ModelLoader

    return ModelLoader().load_from_file(str(path)).eval()


def load_ours(path: Path, dtype: str = "fp32"):
    from dreamforge_upscale.upscalers import GANUpscaler

    return GANUpscaler.load(path, dtype=dtype)


# -------------------------------------------------------------------------------------- variants

def run_untiled(model, x_nchw):
    import torch

    with torch.inference_mode():
        return model(x_nchw)  # N,C,H,W


def run_core(model, image):
    import torch

    with torch.inference_mode():  # ComfyUI's executor runs every node under inference_mode
        return core_node().execute(model, image)[0]  # B,H,W,C


def run_ours(upscaler, image, tile=0):
    from dreamforge_upscale.upscalers import UpscaleRequest, upscale

    return upscale(upscaler, image, UpscaleRequest(tile=tile))  # (B,H,W,C, receipt)


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(variants: dict, repeats: int, log) -> tuple[dict, dict]:
    """Run every variant `repeats` times, interleaved, rotating the order each repeat."""
    names = list(variants)
    times = {n: [] for n in names}
    outputs = {}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            outputs.pop(name, None)
            dt, out = timed(variants[name])
            times[name].append(dt)
            outputs[name] = out
            log(f"    rep {rep + 1}/{repeats} {name:<10} {dt:8.2f} s")
    return times, outputs


def med(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------------- fidelity

def as_bhwc(nchw):
    return nchw.permute(0, 2, 3, 1)


def overlap_mask_1d(starts, length, scale):
    """Output positions covered by more than one tile along an axis (tile = (start, length))."""
    import torch

    cov = torch.zeros(length, dtype=torch.int32)
    for s, n in starts:
        cov[s * scale : (s + n) * scale] += 1
    return cov > 1


def ours_axis_tiles(axis):
    return [(s, axis.tile) for s in axis.starts]


def core_axis_tiles(length, tile=512, overlap=32):
    """Tile (start, length) along one axis exactly as comfy.utils.tiled_scale_multidim places them."""
    if length <= tile:
        return [(0, length)]
    out = []
    for it in range(0, length - overlap, tile - overlap):
        pos = max(0, min(length - overlap, it))
        out.append((pos, min(tile, length - pos)))
    return out


def seam_stats(diff, rows, cols, height, width, scale):
    """Mean |diff| (x255) over output pixels in tile overlaps vs in tile interiors."""
    mr = overlap_mask_1d(rows, height * scale, scale)
    mc = overlap_mask_1d(cols, width * scale, scale)
    mask = mr[:, None] | mc[None, :]
    d = diff[0].mean(dim=-1)  # H,W mean over channels
    over = float(d[mask].mean()) * 255 if bool(mask.any()) else float("nan")
    inner = float(d[~mask].mean()) * 255
    return {"overlap_mean": over, "interior_mean": inner, "overlap_px_fraction": float(mask.float().mean())}


def fidelity(ref_bhwc, out_bhwc):
    """|out - ref| map, its max and mean (x255), and the share of values that change once saved as 8-bit."""
    d = (out_bhwc.float() - ref_bhwc.float()).abs()
    q8 = (out_bhwc.float().mul(255).round() != ref_bhwc.float().mul(255).round()).float().mean()
    return d, {"max": float(d.max()) * 255, "mean": float(d.mean()) * 255, "changed_8bit": float(q8)}


# ------------------------------------------------------------------------------------ GAN cases

def gan_case(name: str, weights: Path, size: int, repeats: int, tiled: bool, log) -> dict:
    log(f"== {name}: {weights.name}, {size}x{size} retina crop, {repeats} repeat(s)")
    image = photo(size)
    x_nchw = image.permute(0, 3, 1, 2).contiguous()
    model = load_baseline(weights)
    ours = load_ours(weights)
    scale = ours.scale

    warm = photo(min(64, size))
    warm_nchw = warm.permute(0, 3, 1, 2).contiguous()
    run_untiled(model, warm_nchw), run_core(model, warm), run_ours(ours, warm)

    variants = {
        "untiled": lambda: run_untiled(model, x_nchw),
        "core": lambda: run_core(model, image),
        "ours": lambda: run_ours(ours, image),
    }
    times, outputs = interleave(variants, repeats, log)
    ref = as_bhwc(outputs.pop("untiled"))
    core_out = outputs.pop("core")
    ours_out, receipt = outputs.pop("ours")

    res = {
        "model": weights.name,
        "input": [size, size],
        "repeats": repeats,
        "seconds": times,
        "median": {k: med(v) for k, v in times.items()},
        "min": {k: min(v) for k, v in times.items()},
        "ours_tile_plan": tile_plan(receipt),
        "ours_dtype": receipt_dtype(receipt),
    }
    res["ratio_ours_core"] = res["median"]["ours"] / res["median"]["core"]
    res["ratio_ours_untiled"] = res["median"]["ours"] / res["median"]["untiled"]
    res["ratio_core_untiled"] = res["median"]["core"] / res["median"]["untiled"]
    res["ratio_ours_core_min"] = res["min"]["ours"] / res["min"]["core"]
    res["ratio_ours_untiled_min"] = res["min"]["ours"] / res["min"]["untiled"]

    diff_core, res["core_dev"] = fidelity(ref, core_out)
    res["core_seams"] = seam_stats(diff_core, core_axis_tiles(size), core_axis_tiles(size), size, size, scale)
    res["core_tiles_per_axis"] = [n for _, n in core_axis_tiles(size)]
    _, res["ours_auto_dev"] = fidelity(ref, ours_out)
    del diff_core, core_out, ours_out

    # Forced tiling: the seams and the context are what is measured here.
    from dreamforge_upscale.tiling import plan_tiles
    from dreamforge_upscale.upscalers import DEFAULT_OVERLAP

    caps = ours.capabilities
    plan = plan_tiles(size, size, FIDELITY_TILE, DEFAULT_OVERLAP, caps.context, caps.size_multiple,
                      caps.min_size, caps.square)
    if plan.untiled or not tiled:
        res["tiled"] = None
        log(f"    forced tile {FIDELITY_TILE}: " + ("input too small to tile" if tiled else "--skip-tiled") + " (skipped)")
    else:
        dt, (tiled_out, tiled_receipt) = timed(lambda: run_ours(ours, image, tile=FIDELITY_TILE))
        assert tile_plan(tiled_receipt) == plan.describe(), (tile_plan(tiled_receipt), plan.describe())
        log(f"    forced tile {FIDELITY_TILE}: {dt:.2f} s, plan {tile_plan(tiled_receipt)}")
        diff, dev = fidelity(ref, tiled_out)
        seams = seam_stats(diff, ours_axis_tiles(plan.rows), ours_axis_tiles(plan.cols), size, size, scale)
        res["tiled"] = {"tile": FIDELITY_TILE, "seconds": dt, "plan": tile_plan(tiled_receipt), **dev, **seams}
    del model, ours
    gc.collect()
    return res


def bf16_case(weights: Path, size: int, repeats: int, log) -> dict:
    from dreamforge_upscale.runtime.dtypes import cpu_bf16_accelerated

    log(f"== bf16: {weights.name}, {size}x{size} crop, {repeats} repeat(s)")
    image = photo(size)
    x_nchw = image.permute(0, 3, 1, 2).contiguous()
    model = load_baseline(weights)
    ours32 = load_ours(weights, "fp32")
    res = {"model": weights.name, "input": [size, size], "cpu_bf16_accelerated": cpu_bf16_accelerated()}
    try:
        ours16 = load_ours(weights, "bf16")
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        res["error"] = f"{type(exc).__name__}: {exc}"
        return res
    warm = photo(min(64, size))
    run_core(model, warm), run_ours(ours32, warm), run_ours(ours16, warm)
    ref = as_bhwc(run_untiled(model, x_nchw))
    variants = {
        "core_fp32": lambda: run_core(model, image),
        "ours_fp32": lambda: run_ours(ours32, image),
        "ours_bf16": lambda: run_ours(ours16, image),
    }
    times, outputs = interleave(variants, repeats, log)
    out16, receipt = outputs["ours_bf16"]
    res.update({
        "seconds": times,
        "median": {k: med(v) for k, v in times.items()},
        "ours_bf16_dtype": receipt_dtype(receipt),
    })
    res["speedup_vs_core_fp32"] = res["median"]["core_fp32"] / res["median"]["ours_bf16"]
    res["bf16_vs_fp32_slowdown"] = res["median"]["ours_bf16"] / res["median"]["ours_fp32"]
    _, res["bf16_dev"] = fidelity(ref, out16)
    return res


# ---------------------------------------------------------------------------------------- memory

def memory_worker(variant: str, size: int, tile: int, weights: Path) -> dict:
    """Runs in a fresh process: RSS after model + input are loaded vs the peak during one upscale."""
    image = photo(size)
    scale = 4
    if variant == "untiled":
        model = load_baseline(weights)
        x = image.permute(0, 3, 1, 2).contiguous()
        del image
        fn = lambda: run_untiled(model, x)  # noqa: E731
    elif variant == "core":
        model = load_baseline(weights)
        fn = lambda: run_core(model, image)  # noqa: E731
    else:
        ours = load_ours(weights)
        t = tile if variant == "ours_tiled" else 0
        fn = lambda: run_ours(ours, image, tile=t)  # noqa: E731
    measured = measure_peak(fn)
    out = measured.value
    plan = tile_plan(out[1]) if isinstance(out, tuple) else None
    canvas = size * scale * size * scale * 3 * 4
    return {
        "variant": variant, "size": size, "seconds": measured.seconds, "baseline_rss": measured.baseline,
        "peak_rss_sampled": measured.peak_sampled, "peak_rss_hwm": measured.peak_hwm, "peak_above": measured.above,
        "canvas_bytes": canvas, "ratio": measured.above / canvas, "tile_plan": plan,
    }


def memory_case(size: int, tile: int, weights: Path, comfy_dir: Path, log) -> dict:
    log(f"== memory: {weights.name}, retina resized to {size}x{size}, one subprocess per variant")
    results = {}
    # one fresh process per variant; a smoke run starts one for all four (the same worker, imports paid once)
    groups = [MEMORY_VARIANTS] if bench_smoke.smoke() else [(v,) for v in MEMORY_VARIANTS]
    for group in groups:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", ",".join(group),
               "--memory-size", str(size), "--memory-tile", str(tile), "--weights", str(weights.parent),
               "--comfy", str(comfy_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        done = {r["variant"]: r for r in (json.loads(ln[len("RESULT "):]) for ln in lines)}
        for variant in group:
            if variant not in done:
                results[variant] = {"error": (proc.stderr or proc.stdout)[-2000:]}
                log(f"    {variant:<10} FAILED: {(proc.stderr or '').strip().splitlines()[-1:]}")
                continue
            r = results[variant] = done[variant]
            log(f"    {variant:<10} +{r['peak_above'] / 2**20:8.0f} MiB above {r['baseline_rss'] / 2**20:.0f} MiB "
                f"= {r['ratio']:.2f}x canvas  ({r['seconds']:.1f} s)")
    return {"model": weights.name, "input": [size, size], "tile": tile, "variants": results,
            "canvas_bytes": size * 4 * size * 4 * 3 * 4}


# ---------------------------------------------------------------------------------- unseen cases

def skimage_photo(name: str, side: int = 0):
    """A scikit-image photo as B,H,W,3 float32 (its own size; `side` > 0 crops the centre, for --quick)."""
    import numpy as np
    import skimage.data
    import torch

    arr = getattr(skimage.data, name)()
    arr = (arr[0] if isinstance(arr, tuple) else arr)[..., :3]  # stereo_motorcycle: (left, right, disparity)
    if side:
        top, left = max(0, (arr.shape[0] - side) // 2), max(0, (arr.shape[1] - side) // 2)
        arr = arr[top : top + side, left : left + side]
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)[None]


def unseen_weights(kind: str, weights: Path, tmp: Path) -> Path:
    if kind == "bundled":
        from dreamforge_upscale.assets.bundled_model import bundled_model_path

        return bundled_model_path()
    if kind == "rrdb6":
        import torch
        from gpu_suite import rrdb_state_dict  # benchmarks/ is on sys.path

        path = tmp / "rrdb6_random.pth"
        if not path.exists():
            torch.save({"params_ema": rrdb_state_dict(6, 64, seed=6)}, path)
        return path
    return weights / kind


def parse_crops(text: str) -> dict[str, int]:
    """"immuno=192,motorcycle=256" -> {"immuno": 192, "motorcycle": 256}."""
    crops = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, side = item.partition("=")
        if not sep or not side.strip().isdigit() or int(side) < 16:
            raise SystemExit(f"--crop: {item!r} is not LABEL=SIDE with SIDE >= 16 (e.g. immuno=192)")
        crops[key.strip()] = int(side)
    return crops


def crop_for(label: str, crops: dict[str, int], default: int) -> int:
    """The centre-crop side for an unseen case: the first --crop key found in its label, else `default`."""
    return next((side for key, side in crops.items() if key in label), default)


def rss_mib() -> float:
    from peak_memory import rss

    return rss() / 2**20


def run_reuse_off(upscaler, image):
    """Ours with the CPU memory reuse switched off for this call (the env switch is read per call)."""
    old = os.environ.get(REUSE_ENV)
    os.environ[REUSE_ENV] = "0"
    try:
        return run_ours(upscaler, image)
    finally:
        if old is None:
            del os.environ[REUSE_ENV]
        else:
            os.environ[REUSE_ENV] = old


def unseen_case(label: str, photo_name: str, kind: str, weights: Path, repeats: int, crop_side: int, log) -> dict:
    """untiled / core / ours / ours without memory reuse, interleaved: seconds, peak RSS and RSS after."""
    import tempfile

    from peak_memory import measure_peak

    image = skimage_photo(photo_name, crop_side)
    h, w = image.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = unseen_weights(kind, weights, Path(tmp))
        model, ours = load_baseline(path), load_ours(path)
    log(f"== unseen: {label}, {w}x{h}, {repeats} repeat(s)")
    x_nchw = image.permute(0, 3, 1, 2).contiguous()
    warm = image[:, :48, :48]
    run_untiled(model, warm.permute(0, 3, 1, 2).contiguous()), run_core(model, warm), run_ours(ours, warm)
    variants = {
        "untiled": lambda: run_untiled(model, x_nchw),
        "core": lambda: run_core(model, image),
        "ours": lambda: run_ours(ours, image),
        "ours_reuse_off": lambda: run_reuse_off(ours, image),
    }
    names = list(variants)
    seconds = {n: [] for n in names}
    peak = {n: [] for n in names}
    after = {n: [] for n in names}
    outputs = {}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            outputs.pop(name, None)
            r = measure_peak(variants[name])  # trims the heap first: every variant starts from the same RSS
            out = r.value[0] if isinstance(r.value, tuple) else r.value
            after[name].append(rss_mib() - r.baseline / 2**20)
            seconds[name].append(r.seconds)
            peak[name].append(r.above / 2**20)
            outputs[name] = out if name != "untiled" else as_bhwc(out)
            plan = tile_plan(r.value[1]) if isinstance(r.value, tuple) else None
            log(f"    rep {rep + 1}/{repeats} {name:<15} {r.seconds:8.2f} s  peak +{r.above / 2**20:6.0f} MiB"
                + (f"  plan {plan['count']} tile(s)" if plan else ""))
            if isinstance(r.value, tuple):
                outputs[name + "_plan"] = plan
    m = {n: med(v) for n, v in seconds.items()}
    ref = outputs["untiled"]
    _, dev = fidelity(ref, outputs["ours"])
    _, dev_core = fidelity(ref, outputs["core"])
    return {
        "label": label, "input": [w, h], "crop": crop_side, "model": path.name, "repeats": repeats, "seconds": seconds, "median": m,
        "peak_mib": {n: med(v) for n, v in peak.items()}, "after_mib": {n: med(v) for n, v in after.items()},
        "ours_core": m["ours"] / m["core"], "ours_untiled": m["ours"] / m["untiled"],
        "reuse_speedup": m["ours_reuse_off"] / m["ours"], "ours_dev": dev, "core_dev": dev_core,
        "plan": outputs.get("ours_plan"),
    }


def unseen_in_subprocess(label: str | list[str], repeats: int, args, log) -> list[dict]:
    """One unseen case in a fresh interpreter. A pass whose heap bound is lifted (> 2 GiB of activations,
    runtime/cpu_allocator.py) leaves glibc's heap laid out so that later plain calls in the same process fault
    far less (a plain Compact call on 600x400: 6.6 s before, 3.3 s after one), which would time the next
    case's untiled and core variants in a state no fresh ComfyUI process has."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        labels = label if isinstance(label, list) else [label]
        cmd = [sys.executable, __file__, "--cases", "unseen", "--unseen", ",".join(labels), "--unseen-worker", "--repeats",
               str(repeats), "--weights", str(args.weights), "--comfy", str(args.comfy), "--json", str(out)]
        cmd += ["--crop", args.crop] if args.crop else []
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(("==", "    rep")):
                log(line)
        if proc.returncode != 0:
            raise SystemExit(f"unseen case {label!r} failed:\n{proc.stdout[-3000:]}")
        return json.loads(out.read_text())["unseen"]


def unseen_report(cases: list[dict], quick: bool) -> list[str]:
    L = ["\n#### Unseen photos and models (fp32, medians of interleaved repeats; peak/after = RSS above the "
         "call's start, MiB)\n",
         "| case | input | untiled s | core s | ours s | ours, reuse off s | ours/core | ours/untiled | reuse speed-up "
         "| peak ours / reuse off / untiled / core | RSS after ours / reuse off | max dev ours, core (/255) | plan |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cases:
        m, pk, af = r["median"], r["peak_mib"], r["after_mib"]
        plan = r["plan"]
        crop = " (centre crop)" if r.get("crop") else ""
        L.append(f"| {r['label']} | {r['input'][0]}×{r['input'][1]}{crop} | {m['untiled']:.2f} | {m['core']:.2f} | "
                 f"{m['ours']:.2f} | {m['ours_reuse_off']:.2f} | **{r['ours_core']:.2f}×** | **{r['ours_untiled']:.2f}×** "
                 f"| {r['reuse_speedup']:.2f}× | {pk['ours']:.0f} / {pk['ours_reuse_off']:.0f} / {pk['untiled']:.0f} / "
                 f"{pk['core']:.0f} | {af['ours']:.0f} / {af['ours_reuse_off']:.0f} | {r['ours_dev']['max']:.3f}, "
                 f"{r['core_dev']['max']:.2f} | {plan['count'] if plan else '?'} tile(s) |")
    L.append("\nRaw seconds (run order per variant):\n")
    for r in cases:
        L.append(f"- {r['label']}: " + "; ".join(f"{n} " + ", ".join(f"{s:.2f}" for s in v)
                                                  for n, v in r["seconds"].items()))
    L.append("\n| target | " + " | ".join(r["label"] for r in cases) + " |")
    L.append("|---|" + "---|" * len(cases))
    for key, text in (("ours_core", "ours ≤ 0.8× core"), ("ours_untiled", "ours ≤ 0.75× untiled")):
        L.append(f"| {text} | " + " | ".join(f"{r[key]:.2f}× {ok(r[key] <= UNSEEN_TARGETS[key])}" for r in cases) + " |")
    L.append("| no fidelity loss (ours max dev ≤ 1/255) | " + " | ".join(
        f"{r['ours_dev']['max']:.3f} {ok(r['ours_dev']['max'] <= 1.0)}" for r in cases) + " |")
    if quick or bench_smoke.smoke():
        L.append("\n(quick run: cropped photos, sizes too small for a verdict)")
    return L


# --------------------------------------------------------------------------------------- report

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def report(results: dict, args) -> str:
    L = []
    env = results["env"]
    L.append(f"### DreamForge GAN benchmark ({'smoke' if bench_smoke.smoke() else 'quick' if args.quick else 'full'} run)\n")
    L.append(f"- date: {env['date']}; CPU: {env['cpu']} ({env['cores']} cores, torch threads {env['threads']}); "
             f"torch {env['torch']}, spandrel {env['spandrel']}; native bf16: {env['bf16_native']}")
    L.append(f"- command: `{env['command']}`\n")
    targets = []

    gan = [(k, results[k]) for k in ("compact", "x4plus") if k in results]
    if gan:
        L.append("#### Speed (fp32, median of interleaved repeats)\n")
        L.append("| case | input | repeats | untiled s | core s | ours s (auto) | ours/core | ours/untiled | core/untiled | ours plan |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for k, r in gan:
            m = r["median"]
            plan = r["ours_tile_plan"]
            L.append(f"| {k} | {r['input'][0]}² | {r['repeats']} | {m['untiled']:.2f} | {m['core']:.2f} | {m['ours']:.2f} "
                     f"| {r['ratio_ours_core']:.2f}× | {r['ratio_ours_untiled']:.2f}× | {r['ratio_core_untiled']:.2f}× "
                     f"| {plan['count']} tile(s), {plan['tile'][0]} px |")
            targets.append((f"{k}: ours ≤ 0.8× core", f"{r['ratio_ours_core']:.2f}× (min-based {r['ratio_ours_core_min']:.2f}×)",
                            r["ratio_ours_core"] <= TARGETS["speed_vs_core"]))
            targets.append((f"{k}: ours ≤ 1.0× untiled", f"{r['ratio_ours_untiled']:.2f}× (min-based {r['ratio_ours_untiled_min']:.2f}×)",
                            r["ratio_ours_untiled"] <= TARGETS["speed_vs_untiled"]))
        L.append("\nRaw seconds (in run order per variant):\n")
        for k, r in gan:
            raw = "; ".join(f"{n} " + ", ".join(f"{s:.2f}" for s in v) for n, v in r["seconds"].items())
            L.append(f"- {k}: {raw}")

        L.append(f"\n#### Fidelity vs the untiled pass (values /255; ours forced to tile {FIDELITY_TILE}, default overlap)\n")
        L.append("| case | variant | tiles | max dev | mean dev | mean dev in overlaps / in interiors | 8-bit values changed | s |")
        L.append("|---|---|---|---|---|---|---|---|")
        for k, r in gan:
            t = r["tiled"]
            if t is None:
                L.append(f"| {k} | ours, tile {FIDELITY_TILE} | n/a (skipped / too small to tile) | | | | | |")
            else:
                p = t["plan"]
                L.append(f"| {k} | ours, tile {FIDELITY_TILE} | {p['grid'][0]}×{p['grid'][1]} of {p['tile'][0]} px "
                         f"(window {p['window'][0]}, overlap {p['overlap']}) | {t['max']:.2f} | {t['mean']:.4f} "
                         f"| {t['overlap_mean']:.4f} / {t['interior_mean']:.4f} | {100 * t['changed_8bit']:.3f}% "
                         f"| {t['seconds']:.1f} |")
                limit = TARGETS["max_dev_compact" if k == "compact" else "max_dev_x4plus"]
                targets.append((f"{k}: tiled max dev ≤ {limit:g}/255", f"{t['max']:.2f}/255", t["max"] <= limit))
                excess = t["overlap_mean"] - t["interior_mean"]
                targets.append((f"{k}: no seam (overlap mean dev − interior mean dev < {SEAM_EXCESS}/255)",
                                f"{t['overlap_mean']:.4f} vs {t['interior_mean']:.4f} /255 (excess {excess:.4f})",
                                excess < SEAM_EXCESS))
            c, cs = r["core_dev"], r["core_seams"]
            tiles = r["core_tiles_per_axis"]
            seam = (f"{cs['overlap_mean']:.4f} / {cs['interior_mean']:.4f}" if len(tiles) > 1 else "n/a (1 tile)")
            L.append(f"| {k} | core node (512/32) | {'+'.join(map(str, tiles))} px per axis | {c['max']:.2f} "
                     f"| {c['mean']:.4f} | {seam} | {100 * c['changed_8bit']:.3f}% | {r['median']['core']:.1f} |")
            a = r["ours_auto_dev"]
            plan = r["ours_tile_plan"]
            L.append(f"| {k} | ours, default (auto) | {plan['count']} | {a['max']:.3f} | {a['mean']:.4f} | "
                     f"| {100 * a['changed_8bit']:.3f}% | {r['median']['ours']:.1f} |")

    if "bf16" in results:
        r = results["bf16"]
        L.append(f"\n#### bf16 ({r['model']}, {r['input'][0]}², CPU native bf16: {r['cpu_bf16_accelerated']})\n")
        if "error" in r:
            L.append(f"bf16 could not run: {r['error']}")
        else:
            m = r["median"]
            L.append("| core fp32 s | ours fp32 s | ours bf16 s | speed-up of ours bf16 vs core fp32 | bf16 / fp32 (ours) | bf16 mean dev | bf16 max dev |")
            L.append("|---|---|---|---|---|---|---|")
            L.append(f"| {m['core_fp32']:.3f} | {m['ours_fp32']:.3f} | {m['ours_bf16']:.3f} | {r['speedup_vs_core_fp32']:.2f}× "
                     f"| {r['bf16_vs_fp32_slowdown']:.2f}× slower | {r['bf16_dev']['mean']:.3f}/255 | {r['bf16_dev']['max']:.2f}/255 |")
            targets.append(("bf16: ≥ 2.5× faster than core fp32", f"{r['speedup_vs_core_fp32']:.2f}×",
                            r["speedup_vs_core_fp32"] >= TARGETS["bf16_speedup"]))
            targets.append(("bf16: mean dev ≤ 1/255", f"{r['bf16_dev']['mean']:.3f}/255",
                            r["bf16_dev"]["mean"] <= TARGETS["bf16_mean_dev"]))

    if "memory" in results:
        r = results["memory"]
        canvas = r["canvas_bytes"]
        L.append(f"\n#### Memory ({r['model']}, {r['input'][0]}² → {4 * r['input'][0]}², float32 canvas "
                 f"{canvas / 2**20:.0f} MiB; peak RSS above model + input, fresh process each)\n")
        L.append("| variant | baseline MiB | peak above MiB | × canvas | seconds | plan |")
        L.append("|---|---|---|---|---|---|")
        for v, x in r["variants"].items():
            if "error" in x:
                L.append(f"| {v} | failed | | | | |")
                continue
            plan = x["tile_plan"]
            ptxt = f"{plan['count']} tiles of {plan['tile'][0]} px" if plan and plan["count"] > 1 else (
                "1 tile (untiled)" if plan else ("512 px tiles, 32 overlap" if v == "core" else "whole image"))
            L.append(f"| {v} | {x['baseline_rss'] / 2**20:.0f} | {x['peak_above'] / 2**20:.0f} | {x['ratio']:.2f}× "
                     f"| {x['seconds']:.1f} | {ptxt} |")
        t = r["variants"].get("ours_tiled", {})
        if "ratio" in t:
            targets.append((f"memory: ours tiled ({r['tile']} px) ≤ 1.6× canvas", f"{t['ratio']:.2f}×",
                            t["ratio"] <= TARGETS["memory_ratio"]))

    if "unseen" in results:
        L.extend(unseen_report(results["unseen"], args.quick))

    if targets:
        small = args.quick or bench_smoke.smoke()
        L.append("\n#### Targets" + (" (quick smoke run: sizes too small for a verdict, use the full run)" if small else "") + "\n")
        L.append("| target | measured | met |")
        L.append("|---|---|---|")
        for name, val, flag in targets:
            L.append(f"| {name} | {val} | {ok(flag)} |")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under 2 minutes")
    ap.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma list of {', '.join(ALL_CASES)}")
    ap.add_argument("--repeats", type=int, default=0, help="override the repeats of the speed cases")
    ap.add_argument("--skip-tiled", action="store_true", help="speed only: skip the forced-tile fidelity runs")
    ap.add_argument("--weights", type=Path, default=default_weights(), help="folder with the .pth files")
    ap.add_argument("--comfy", type=Path, default=default_comfy(), help="ComfyUI tree (core's node)")
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--unseen", default="", help="only the unseen cases whose label contains one of these (comma list)")
    ap.add_argument("--crop", default="", help="centre crops for unseen cases, e.g. immuno=192,motorcycle=256 "
                    "(label substring=side): RRDB on a whole photo takes minutes per call on a loaded 2-core CPU")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)  # a variant, or a comma list (smoke run)
    ap.add_argument("--unseen-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-size", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--memory-tile", type=int, default=FIDELITY_TILE, help=argparse.SUPPRESS)
    args = ap.parse_args()

    setup_imports(args.comfy)
    bench_smoke.limit_threads()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_suite's random RRDB builder
    if args.memory_worker:
        for variant in args.memory_worker.split(","):
            if variant not in MEMORY_VARIANTS:
                raise SystemExit(f"--memory-worker: {variant!r} is not one of {', '.join(MEMORY_VARIANTS)}")
            res = memory_worker(variant, args.memory_size, args.memory_tile, args.weights / COMPACT)
            print("RESULT " + json.dumps(res), flush=True)
        return

    import spandrel
    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(ALL_CASES)}")
    for f in (COMPACT, X4PLUS):
        if not (args.weights / f).exists():
            raise SystemExit(f"missing weights {args.weights / f} (set --weights or DF_SHARED_WEIGHTS)")
    sizes = SMOKE if bench_smoke.smoke() else QUICK if args.quick else FULL

    def log(msg):
        print(msg, flush=True)

    from dreamforge_upscale.runtime.dtypes import cpu_bf16_accelerated

    results = {"env": {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "spandrel": spandrel.__version__, "bf16_native": cpu_bf16_accelerated(),
        "command": " ".join([".venv/bin/python", "benchmarks/bench_gan.py"] + sys.argv[1:]),
    }}
    started = time.perf_counter()
    for case in cases:
        size, repeats = sizes[case]
        repeats = bench_smoke.capped(args.repeats or repeats, 1)
        if case == "compact":
            results[case] = gan_case(case, args.weights / COMPACT, size, repeats, not args.skip_tiled, log)
        elif case == "x4plus":
            results[case] = gan_case(case, args.weights / X4PLUS, size, repeats, not args.skip_tiled, log)
        elif case == "bf16":
            results[case] = bf16_case(args.weights / COMPACT, size, repeats, log)
        elif case == "memory":
            results[case] = memory_case(size, FIDELITY_TILE, args.weights / COMPACT, args.comfy, log)
        elif case == "unseen":
            picked = [u for u in UNSEEN if not args.unseen or any(k in u[0] for k in args.unseen.split(","))]
            crops = parse_crops(args.crop)
            if len(picked) == 1 or args.unseen_worker:
                results[case] = [unseen_case(label, name, kind, args.weights, repeats, crop_for(label, crops, size), log)
                                 for label, name, kind in picked]
            elif bench_smoke.smoke():  # the same worker, one process for all of them (imports paid once)
                results[case] = unseen_in_subprocess([label for label, _, _ in picked], repeats, args, log)
            else:  # one process per case: what one case's passes leave in glibc must not time the next one
                results[case] = [unseen_in_subprocess(label, repeats, args, log)[0] for label, _, _ in picked]
    results["env"]["total_seconds"] = time.perf_counter() - started
    print()
    print(report(results, args))
    print(f"(total {results['env']['total_seconds']:.0f} s)")
    if bench_smoke.smoke() and not args.unseen_worker:
        print(bench_smoke.note())
    if args.json:  # an unseen worker's --json is its parent's scratch file, never redirected
        path = args.json if args.unseen_worker else bench_smoke.out_path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
