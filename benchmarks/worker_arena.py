#!/usr/bin/env python
"""Does CPU memory reuse need glibc's main arena in a worker thread? One Compact pass per mode, each mode
in its own fresh process (an arena setting lasts for the process), the passes inside a non-main thread
as ComfyUI's prompt worker runs them:

- `arena`:    reuse on, and M_ARENA_MAX=1 set before the worker thread starts (DREAMFORGE_CPU_MALLOC_ARENA=1);
- `no-arena`: reuse on (M_MMAP_MAX=0 and a raised trim threshold during the pass), glibc's arenas as they are;
- `off`:      reuse off (DREAMFORGE_CPU_MALLOC=0): glibc's defaults;
- `core`:     ComfyUI core's "Upscale Image (using Model)" node (512 px tiles) on the same model, glibc's
              defaults (needs ComfyUI: --comfy, default .venv/ComfyUI).

    .venv/bin/python benchmarks/worker_arena.py --photo astronaut --side 512 --rounds 2
    .venv/bin/python benchmarks/worker_arena.py --modes arena,no-arena,core

Prints wall, user, sys seconds and minor page faults of each pass (getrusage of the whole process, so the
torch threads count too), the medians per mode and their ratios to `off` (glibc's defaults): wall time,
and CPU time (user + sys), which a loaded machine disturbs less. Modes are interleaved round by round.
Recorded in docs/speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_smoke
import bench_smoke  # noqa: E402

MODES = ("arena", "no-arena", "off")  # --modes may add "core"

CHILD = r"""
import ctypes, json, os, resource, sys, threading, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import pack_import; pack_import.install()
import torch
import bench_gan
from bench_gan import skimage_photo
from dreamforge_upscale.runtime import cpu_allocator
from dreamforge_upscale.upscalers import GANUpscaler, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path
mode, photo, side, passes, comfy = sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
if mode == "arena":  # before the worker thread starts, as the bridge does when opted in
    assert ctypes.CDLL(None).mallopt(cpu_allocator.M_ARENA_MAX, 1) == 1
if mode == "core":
    from pathlib import Path
    bench_gan.setup_imports(Path(comfy))
    model = bench_gan.load_baseline(bundled_model_path())
    call = lambda img: bench_gan.run_core(model, img)
else:
    upscaler = GANUpscaler.load(bundled_model_path(), dtype="fp32", device=torch.device("cpu"))
    call = lambda img: upscale(upscaler, img)
image = skimage_photo(photo, side)
out = []
def worker():
    call(image[:, :48, :48])  # warm-up
    for _ in range(passes):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        call(image)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out.append({"wall": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                    "faults": r1.ru_minflt - r0.ru_minflt})
t = threading.Thread(target=worker); t.start(); t.join()
print("RESULT " + json.dumps(out))
"""


def run(mode: str, args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["DREAMFORGE_CPU_MALLOC"] = "0" if mode == "off" else "1"
    env.pop("DREAMFORGE_CPU_MALLOC_ARENA", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "scripts"), str(REPO / "benchmarks"), mode,
                           args.photo, str(args.side), str(args.passes), str(args.comfy)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photo", default="astronaut", help="scikit-image photo")
    ap.add_argument("--side", type=int, default=512, help="centre crop side (0: the whole photo)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per mode")
    ap.add_argument("--passes", type=int, default=2, help="passes per process (after a small warm-up)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}, core")
    ap.add_argument("--comfy", type=Path, default=Path(os.environ.get("DF_COMFYUI_DIR", REPO / ".venv" / "ComfyUI")))
    args = ap.parse_args()
    if bench_smoke.smoke():  # the same code path at a tiny size, once (numbers mean nothing)
        args.side, args.rounds, args.passes = bench_smoke.capped(args.side or 64, 64), 1, 1
        print("smoke run (DREAMFORGE_BENCH_SMOKE): 64 px, one process per mode, one pass")
    modes = args.modes.split(",")
    runs = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in (modes if rnd % 2 == 0 else modes[::-1]):
            res = run(mode, args)
            runs[mode] += res
            print(f"round {rnd + 1} {mode:8s}: " + "; ".join(
                f"wall {r['wall']:.2f} user {r['user']:.2f} sys {r['sys']:.2f} faults {r['faults'] / 1e6:.3f} M"
                for r in res), flush=True)
    print(f"\nrealesr-animevideov3 (bundled) on {args.photo} {args.side or 'whole'}, worker thread, "
          f"medians of {args.rounds} x {args.passes} passes\n")
    med = {mode: {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]} for mode in modes}
    for m in med.values():
        m["cpu"] = m["user"] + m["sys"]
    base = med.get("off")
    print("| mode | wall s | user s | sys s | minor faults | wall / off | CPU / off |\n|---|---|---|---|---|---|---|")
    for mode, m in med.items():
        ratios = (f"{m['wall'] / base['wall']:.2f}x | {m['cpu'] / base['cpu']:.2f}x" if base else "- | -")
        print(f"| {mode} | {m['wall']:.2f} | {m['user']:.2f} | {m['sys']:.2f} | {m['faults'] / 1e6:.3f} M | {ratios} |")


if __name__ == "__main__":
    main()
