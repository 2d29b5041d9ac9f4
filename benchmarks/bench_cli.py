"""Images per minute of `upscale` on a folder: local vs Ray Data with 1 and 2 actors, and Ray's overhead.

    .venv/bin/python benchmarks/bench_cli.py [--sizes 6 18] [--side 96] [--scale 2] [--json out.json]

Each configuration runs on two folder sizes (N1 < N2 real photo crops, bundled Compact x4, CPU). The
per-image cost is the slope (t(N2) - t(N1)) / (N2 - N1), so fixed costs (model load, actor start)
drop out; Ray's overhead per image is its slope minus the local slope, and its fixed cost is the
intercept. The Ray cluster (local, 2 CPUs, loopback) is started once; its start-up is reported apart.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # pack_import, cli_photos
sys.path.insert(0, str(REPO / "scripts"))  # bench_smoke
import bench_smoke  # noqa: E402


def make_folder(root: Path, count: int, side: int) -> Path:
    from PIL import Image
    from skimage import data

    folder = root / f"in_{count}"
    folder.mkdir(parents=True)
    photo = data.astronaut()  # 512 x 512
    for i in range(count):  # distinct crops
        y, x = (i * 37) % (512 - side), (i * 53) % (512 - side)
        Image.fromarray(photo[y:y + side, x:x + side]).save(folder / f"crop_{i:03d}.png")
    return folder


def timed_run(folder: Path, out: Path, scale: float, extra: list[str]) -> float:
    from dreamforge_upscale.cli import main

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["upscale", str(folder), "--scale", str(scale), "--out", str(out), "--device", "cpu", *extra])
    if rc != 0:
        raise SystemExit(f"run failed ({rc}): {extra}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[6, 18], metavar=("N1", "N2"))
    ap.add_argument("--side", type=int, default=96, help="input crop side in px")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if bench_smoke.smoke():  # the code path only: 1 and 2 images of 32 px (Ray still starts, both actor counts)
        args.sizes, args.side = [bench_smoke.capped(args.sizes[0], 1), bench_smoke.capped(args.sizes[1], 2)], min(args.side, 32)
    import pack_import

    pack_import.install()
    import ray
    import dreamforge_upscale

    n1, n2 = args.sizes
    results: dict = {"sizes": [n1, n2], "side": args.side, "scale": args.scale, "cpus": os.cpu_count(), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {n: make_folder(root, n, args.side) for n in (n1, n2)}
        timed_run(folders[n1], root / "warm", args.scale, [])  # imports and first model load out of the way
        started = time.perf_counter()
        pkg_root = os.path.dirname(list(dreamforge_upscale.__path__)[0])
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="error",
                 runtime_env={"env_vars": {"PYTHONPATH": pkg_root}})
        results["ray_cluster_start_s"] = round(time.perf_counter() - started, 2)
        # the first Ray run also pays worker-process start-up and imports: keep it out of the measured runs
        if not bench_smoke.smoke():  # a smoke run's numbers mean nothing: its measured runs pay it instead
            timed_run(folders[n1], root / "ray_warm", args.scale, ["--ray", "--actors", "1"])
        try:
            configs = {"local": [], "ray_1_actor": ["--ray", "--actors", "1"], "ray_2_actors": ["--ray", "--actors", "2"]}
            for name, extra in configs.items():
                t = {n: timed_run(folders[n], root / f"{name}_{n}", args.scale, extra) for n in (n1, n2)}
                slope = (t[n2] - t[n1]) / (n2 - n1)
                results["configs"][name] = {
                    "seconds": {str(n): round(v, 2) for n, v in t.items()},
                    "images_per_min": round(n2 / t[n2] * 60, 1),
                    "per_image_s": round(slope, 3),
                    "fixed_s": round(t[n1] - slope * n1, 2),
                }
                print(f"{name:13s} {n1}: {t[n1]:6.2f} s  {n2}: {t[n2]:6.2f} s  {results['configs'][name]['images_per_min']:6.1f} "
                      f"img/min  per image {slope:.3f} s  fixed {t[n1] - slope * n1:.2f} s", flush=True)
        finally:
            ray.shutdown()
    local = results["configs"]["local"]["per_image_s"]
    for name in ("ray_1_actor", "ray_2_actors"):
        results["configs"][name]["overhead_per_image_s"] = round(results["configs"][name]["per_image_s"] - local, 3)
    print(f"Ray cluster start {results['ray_cluster_start_s']} s; overhead per image vs local: "
          f"1 actor {results['configs']['ray_1_actor']['overhead_per_image_s']} s, "
          f"2 actors {results['configs']['ray_2_actors']['overhead_per_image_s']} s")
    if bench_smoke.smoke():
        print(bench_smoke.note())
    if args.json:
        path = bench_smoke.out_path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
