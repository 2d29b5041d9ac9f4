#!/usr/bin/env python
"""What one model pass costs per input pixel as the window grows, and where a pass spends its time.

The tile planner (tiling/cost.py) assumes a conv net's cost per pixel does not depend on the window
size; this measures it. Two ways of running the same weights, side by side at each window side:

* ours  -- the pack's GAN backend (channels_last, nearest-upsample heads rewritten, CPU memory reuse);
* head  -- ours with the model's own nearest-upsample heads (not rewritten): what the rewrite buys;
* plain -- the spandrel model as ComfyUI core and a plain user call it (NCHW, glibc defaults).

`--profile SIDE` adds a torch.profiler table of one `ours` pass: the share of each op, convolutions
grouped by their shape, which says whether the pass is bound by arithmetic (convolutions) or by
memory traffic (cat, activations, copies). Usage:

    .venv/bin/python benchmarks/window_cost.py --blocks 6 --sides 128,256,384,512 --profile 384
    .venv/bin/python benchmarks/window_cost.py --model ../shared/weights/RealESRGAN_x4plus.pth --sides 64,128,192,256,320
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "scripts"), str(Path(__file__).resolve().parent)]
import bench_smoke  # noqa: E402
import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402

from gpu_suite import rrdb_state_dict  # noqa: E402


def best_of(fn, x, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


def profile_table(fn, x, rows: int = 10) -> list[str]:
    from torch.profiler import profile

    fn(x)
    with profile(record_shapes=True) as prof:
        fn(x)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    named = []
    for e in events:
        name = e.key
        if name in ("aten::conv2d", "aten::convolution", "aten::_convolution"):
            continue  # dispatch wrappers of the backend kernel below: counted once, there
        if "convolution" in name and e.input_shapes and len(e.input_shapes[0]) == 4 and len(e.input_shapes[1]) == 4:
            (_, cin, h, _), (cout, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
            name = f"conv {cin}->{cout} {kh}x{kw} at {round(h / x.shape[-2])}x"  # padded phase windows round down
        named.append((name, e.self_cpu_time_total, e.count))
    merged: dict[str, list] = {}
    for name, t, n in named:
        m = merged.setdefault(name, [0, 0])
        m[0] += t
        m[1] += n
    out = [f"\nProfile of one `ours` pass at {x.shape[-2]}x{x.shape[-1]} (share of self CPU time):\n",
           "| op | share | calls |", "|---|---|---|"]
    for name, (t, n) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:rows]:
        out.append(f"| {name} | {100 * t / total:.1f}% | {n} |")
    conv = sum(t for name, (t, _) in merged.items() if name.startswith("conv") or "convolution" in name)
    out.append(f"\nConvolutions: {100 * conv / total:.1f}% of the pass.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a .pth file (default: a random RRDB x4 with --blocks blocks)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--sides", default="128,256,384", help="square window sides, comma list")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many calls per side and variant")
    ap.add_argument("--profile", type=int, default=0, help="also profile one ours pass at this side")
    args = ap.parse_args()
    if bench_smoke.smoke():  # the code path only: a 1-block RRDB, windows of 16 and 32 px, one call each
        args.blocks, args.sides, args.repeats = 1, "16,32", 1
        args.profile = min(args.profile, 32)
        bench_smoke.limit_threads()

    from spandrel import ModelLoader

    from dreamforge_upscale.runtime.cpu_allocator import reuse
    from dreamforge_upscale.upscalers import GANUpscaler

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / f"rrdb{args.blocks}.pth"
            torch.save({"params_ema": rrdb_state_dict(args.blocks, 64, seed=args.blocks)}, path)
        ours = GANUpscaler.load(path, dtype="fp32", device=torch.device("cpu"))
        plain = ModelLoader().load_from_file(str(path)).eval()
        published = ModelLoader().load_from_file(str(path)).eval()
    published.model.to(memory_format=torch.channels_last)
    head = GANUpscaler.from_descriptor(published)  # a borrowed model is never rewritten
    label = path.name if args.model else f"RRDB {args.blocks}B (random)"

    def reusing(upscaler):
        def run(x):
            with reuse(torch.device("cpu"), keep=int(x.numel() / 3 * upscaler.capabilities.bytes_per_pixel * 2)):
                return upscaler.forward(x)
        return run

    run_ours, run_head = reusing(ours), reusing(head)

    def run_plain(x):
        with torch.inference_mode():
            return plain(x)

    sides = [int(s) for s in args.sides.split(",") if s.strip()]
    warm = torch.rand(1, 3, 32, 32)
    run_ours(warm.contiguous(memory_format=torch.channels_last)), run_head(warm.contiguous(
        memory_format=torch.channels_last)), run_plain(warm)
    print(f"{label}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}\n")
    print(f"nearest-upsample heads rewritten in ours: {ours.rewritten_upconvs}\n")
    print("| window | ours s | ours µs/px | head s | head µs/px | plain s | plain µs/px | ours/head | ours/plain |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        x = torch.rand(1, 3, side, side)
        cl = x.contiguous(memory_format=torch.channels_last)
        t_ours, t_head = best_of(run_ours, cl, args.repeats), best_of(run_head, cl, args.repeats)
        t_plain = best_of(run_plain, x, args.repeats)
        us = [1e6 * t / (side * side) for t in (t_ours, t_head, t_plain)]
        print(f"| {side}² | {t_ours:.2f} | {us[0]:.1f} | {t_head:.2f} | {us[1]:.1f} | {t_plain:.2f} | {us[2]:.1f} | "
              f"{t_ours / t_head:.2f} | {t_ours / t_plain:.2f} |", flush=True)
    if args.profile:
        x = torch.rand(1, 3, args.profile, args.profile).contiguous(memory_format=torch.channels_last)
        print("\n".join(profile_table(run_ours, x)))
    if bench_smoke.smoke():
        print(bench_smoke.note())


if __name__ == "__main__":
    main()
