#!/usr/bin/env python
"""What CPU memory reuse changes in one pass: CPU seconds (user, sys), minor page faults, wall, peak RSS.

CPU seconds and page faults move far less than wall time when other jobs share the cores, so this shows
the mechanism (runtime/cpu_allocator.py) on a loaded machine where the interleaved wall-time ratios of
bench_gan.py are too noisy. Ours with reuse on and off (DREAMFORGE_CPU_MALLOC=0), interleaved:

    .venv/bin/python benchmarks/reuse_faults.py --blocks 6 --side 384 --repeats 2
    .venv/bin/python benchmarks/reuse_faults.py --model ../shared/weights/RealESRGAN_x4plus.pth --side 512
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "scripts"), str(Path(__file__).resolve().parent)]
import bench_smoke  # noqa: E402
import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402

from bench_gan import REUSE_ENV, skimage_photo  # noqa: E402
from gpu_suite import rrdb_state_dict  # noqa: E402
from peak_memory import measure_peak  # noqa: E402


def one_pass(upscaler, image, reuse: bool) -> dict:
    from dreamforge_upscale.upscalers import upscale

    os.environ[REUSE_ENV] = "1" if reuse else "0"  # read at every call
    before = resource.getrusage(resource.RUSAGE_SELF)
    r = measure_peak(lambda: upscale(upscaler, image))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": r.seconds, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt, "peak_mib": r.above / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a .pth file (default: a random RRDB x4 with --blocks blocks)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--photo", default="stereo_motorcycle", help="scikit-image photo")
    ap.add_argument("--side", type=int, default=384, help="centre crop side (0: the whole photo)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if bench_smoke.smoke():  # the code path only: a 1-block RRDB on a 32 px crop, one repeat, one thread
        args.blocks, args.side, args.repeats = 1, min(args.side or 32, 32), 1
        bench_smoke.limit_threads()

    from dreamforge_upscale.upscalers import GANUpscaler

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / f"rrdb{args.blocks}.pth"
            torch.save({"params_ema": rrdb_state_dict(args.blocks, 64, seed=args.blocks)}, path)
        upscaler = GANUpscaler.load(path, dtype="fp32", device=torch.device("cpu"))
    image = skimage_photo(args.photo, args.side)
    one_pass(upscaler, image[:, :48, :48], True)  # warm-up
    runs = {True: [], False: []}
    for rep in range(args.repeats):
        for reuse in ((True, False) if rep % 2 == 0 else (False, True)):
            res = one_pass(upscaler, image, reuse)
            runs[reuse].append(res)
            print(f"rep {rep + 1} reuse {'on ' if reuse else 'off'}: " + ", ".join(
                f"{k} {v:.2f}" if k != "faults" else f"{k} {v / 1e6:.2f} M" for k, v in res.items()), flush=True)
    h, w = image.shape[1:3]
    print(f"\n{path.name if args.model else f'RRDB {args.blocks}B (random)'} on {args.photo} {w}x{h}, medians of "
          f"{args.repeats}, torch threads {torch.get_num_threads()}\n")
    print("| reuse | wall s | user s | sys s | CPU s | minor faults | peak MiB |\n|---|---|---|---|---|---|---|")
    for reuse in (False, True):
        m = {k: statistics.median(r[k] for r in runs[reuse]) for k in runs[reuse][0]}
        print(f"| {'on' if reuse else 'off'} | {m['wall']:.1f} | {m['user']:.1f} | {m['sys']:.1f} | "
              f"{m['user'] + m['sys']:.1f} | {m['faults'] / 1e6:.2f} M | {m['peak_mib']:.0f} |")
    if bench_smoke.smoke():
        print(bench_smoke.note())


if __name__ == "__main__":
    main()
