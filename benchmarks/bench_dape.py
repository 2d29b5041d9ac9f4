#!/usr/bin/env python
"""Benchmark the DAPE / RAM tagger: tagging time at the real size, and the memory of loading the real-size
checkpoint through the pack's memory-mapped, only-what-is-needed path.

Cases (pick with --cases):

* tag -- RAM Swin-L 384 + tagging head at the published sizes (213M parameters) with random weights,
         built in code (no weights exist here): seconds per describe() of one 512x512 photo (resize to
         384, Swin-L, head over 4585 labels, thresholds), median of --repeats after one warm-up. CPU
         fp32 always; CUDA fp16 too when a GPU is present (--device).
* rss -- a sparse stand-in for ram_swin_large_14m.pth: the published key layout at the real shapes
         (Swin-L, head, label_embed, projections) plus unused text-encoder/decoder and optimizer
         tensors up to the real file's 5.63 GB, all zeros, written as holes (a few MB on disk), and a
         real-size random DAPE LoRA file. In fresh subprocesses: peak resident memory of
         TaggerProvider.load (mmap, needed keys only, LoRA merge) vs a plain
         torch.load(weights_only=True) of the same file. The stand-in is deleted afterwards (also on
         errors and Ctrl-C).

Usage:
    .venv/bin/python benchmarks/bench_dape.py                  # both (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/bench_dape.py --quick          # 1 repeat, a 1.5 GB stand-in: smoke run
    .venv/bin/python benchmarks/bench_dape.py --cases rss --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import measure_peak  # benchmarks/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # pack_import
sys.path.insert(0, str(REPO / "scripts"))  # bench_smoke
import bench_smoke  # noqa: E402

RAM_FILE_BYTES = 5_630_000_000  # ram_swin_large_14m.pth
HEAD = dict(layers=2, hidden=768, width=512, inner=3072)
TAGS = 4585
GIB = 1024**3


def setup() -> None:
    import pack_import

    pack_import.install()


def photo(size: int = 512):
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------- tag
def random_tagger(device: str):
    """The published architecture at full size with random weights (LayerNorms at 1/0)."""
    import torch

    from dreamforge_upscale.zoom.tagger import TagOptions, ram_vocabulary
    from dreamforge_upscale.zoom.tagger.model import LoadInfo, RamTagger
    from dreamforge_upscale.zoom.tagger.provider import TaggerProvider
    from dreamforge_upscale.zoom.tagger.swin import SWIN_L_384, SwinShape

    torch.manual_seed(0)
    model = RamTagger(SwinShape(**SWIN_L_384, mlp_ratio=4.0), HEAD, torch.randn(TAGS, HEAD["hidden"]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02)
                module.bias is not None and module.bias.zero_()
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "patch_embed" in name:
                p.normal_(0, 0.02)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    return TaggerProvider(model, ram_vocabulary(), TagOptions(), "ram:random", LoadInfo("random")), params


def case_tag(repeats: int, devices: list[str]) -> list[dict]:
    import torch

    image = photo()
    rows = []
    for device in devices:
        provider, params = random_tagger(device)
        provider.describe([image])  # warm-up (allocator, kernels)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            provider.describe([image])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        rows.append({"device": device, "dtype": str(provider.model.fc.weight.dtype).replace("torch.", ""),
                     "threads": torch.get_num_threads(), "parameters": params, "image": "512x512",
                     "seconds_median": round(statistics.median(times), 3), "seconds_all": [round(t, 3) for t in times]})
        print(f"tag  {device:4s} {rows[-1]['dtype']}: {rows[-1]['seconds_median']:.3f} s per image "
              f"(median of {repeats}; {params / 1e6:.0f}M parameters)", flush=True)
        del provider
    return rows


# ----------------------------------------------------------------------------------- rss
class SparseWriter:
    """A file-like for torch.save that leaves all-zero 1 MiB runs as holes."""

    CHUNK = 1 << 20

    def __init__(self, fh):
        self.fh, self.pos = fh, 0

    def write(self, data) -> int:
        import numpy as np

        view = memoryview(data).cast("B")
        for i in range(0, len(view), self.CHUNK):
            chunk = view[i:i + self.CHUNK]
            if np.frombuffer(chunk, np.uint8).any():
                self.fh.seek(self.pos)
                self.fh.write(chunk)
            self.pos += len(chunk)
        return len(view)

    def flush(self) -> None:
        self.fh.flush()


def published_shapes() -> dict:
    """{key: shape} of what RAM's checkpoint holds for the tagger, in its (original Swin) layout."""
    import timm

    swin = timm.create_model("swin_large_patch4_window12_384", pretrained=False, num_classes=0, device="meta")
    shapes = {}
    for key, t in swin.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        shapes["visual_encoder." + key] = tuple(t.shape)
    h, w, f = HEAD["hidden"], HEAD["width"], HEAD["inner"]
    for i in range(HEAD["layers"]):
        p = f"vision_multi.encoder.layer.{i}."
        for name, shape in (("crossattention.self.query", (h, h)), ("crossattention.self.key", (h, w)),
                            ("crossattention.self.value", (h, w)), ("crossattention.output.dense", (h, h)),
                            ("intermediate.dense", (f, h)), ("output.dense", (h, f))):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = shape, (shape[0],)
        for name in ("crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (h,)
    shapes |= {"image_proj.weight": (w, 1536), "image_proj.bias": (w,), "label_embed": (TAGS, w),
               "wordvec_proj.weight": (h, w), "wordvec_proj.bias": (h,), "fc.weight": (1, h), "fc.bias": (1,)}
    return shapes


def write_standin(folder: Path, total_bytes: int) -> tuple[Path, Path, dict]:
    import math

    import torch

    shapes = published_shapes()
    needed = sum(4 * math.prod(s) for s in shapes.values())
    filler = max(0, total_bytes - needed)
    piece = 256 * 1024**2
    source = folder / "holes.bin"
    with open(source, "wb") as fh:
        fh.truncate(max(piece, 4 * max(math.prod(s) for s in shapes.values())))

    def zeros(numel: int) -> torch.Tensor:  # a new storage over the hole file: reads as zeros, costs no RAM
        return torch.from_file(str(source), shared=False, size=numel, dtype=torch.float32)

    model = {k: zeros(math.prod(s)).view(s) for k, s in shapes.items()}
    pieces = [zeros(piece // 4) for _ in range(filler // piece)] + ([zeros((filler % piece) // 4)] if filler % piece else [])
    third = len(pieces) // 3  # the text encoder / decoder weights and the optimizer state RAM's file also holds
    model |= {f"tag_encoder.filler.{i}": t for i, t in enumerate(pieces[:third])}
    model |= {f"text_decoder.filler.{i}": t for i, t in enumerate(pieces[third:2 * third])}
    optimizer = {"state": {i: {"exp_avg": t} for i, t in enumerate(pieces[2 * third:])}, "param_groups": [{"lr": 5e-6}]}
    path = folder / "ram_swin_large_14m.pth"
    with open(path, "wb") as fh:
        writer = SparseWriter(fh)
        torch.save({"model": model, "optimizer": optimizer, "config": {"vit": "swin_l", "image_size": 384}, "epoch": 5},
                   writer)
        fh.truncate(writer.pos)
    source.unlink()
    dape = folder / "DAPE.pth"
    torch.manual_seed(0)
    lora = {}
    for key, s in shapes.items():
        if key.endswith("attn.qkv.weight"):
            lora[key[:-6] + "lora_A"] = torch.randn(16, s[1]) * 0.01
            lora[key[:-6] + "lora_B"] = torch.randn(s[0] * 2 // 3, 8) * 0.01
        elif re.search(r"crossattention\.self\.(query|key)\.weight$", key):
            name = key.replace("vision_multi.", "tagging_head.")[:-6]
            lora[name + "lora_A"], lora[name + "lora_B"] = torch.randn(8, s[1]) * 0.01, torch.randn(s[0], 8) * 0.01
    torch.save(lora, dape)
    st = path.stat()
    return path, dape, {"file_bytes": st.st_size, "disk_bytes": st.st_blocks * 512, "needed_bytes": needed,
                        "dape_bytes": dape.stat().st_size}


def child(mode: str, ram: str, dape: str) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    setup()
    import torch

    from dreamforge_upscale.zoom.tagger import TaggerProvider

    if mode == "pack":  # the load, then the first tagging call (which reads the mapped weights)
        result = measure_peak(lambda: TaggerProvider.load(ram, dape))
        tagged = measure_peak(lambda: result.value.describe([photo()]))
        extra = {"first_tag_seconds": round(tagged.seconds, 2),
                 "peak_with_first_tag_above_bytes": max(result.above, tagged.baseline + tagged.above - result.baseline)}
    else:
        result = measure_peak(lambda: torch.load(ram, map_location="cpu", weights_only=True))
        extra = {}
    # sampled peaks only: a child's ru_maxrss starts at its parent's (which read the whole stand-in to write it)
    print(json.dumps({"mode": mode, "seconds": round(result.seconds, 2), "baseline_bytes": result.baseline,
                      "peak_above_bytes": result.above, **extra}))


def run_child(mode: str, ram: Path, dape: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(ram), str(dape)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def case_rss(total_bytes: int, workdir: str | None, full_load: bool) -> dict:
    import psutil

    folder = Path(tempfile.mkdtemp(prefix="dape-standin-", dir=workdir))
    try:
        started = time.perf_counter()
        ram, dape, sizes = write_standin(folder, total_bytes)
        print(f"rss  stand-in {sizes['file_bytes'] / 1e9:.2f} GB ({sizes['disk_bytes'] / 1e6:.1f} MB on disk, "
              f"{sizes['needed_bytes'] / 1e9:.2f} GB of it needed) written in {time.perf_counter() - started:.0f} s",
              flush=True)
        rows = {"sizes": sizes, "pack": run_child("pack", ram, dape)}
        pack = rows["pack"]
        print(f"rss  pack load (mmap, needed keys, LoRA merge): peak {pack['peak_above_bytes'] / GIB:.2f} GiB above the "
              f"process ({pack['baseline_bytes'] / GIB:.2f} GiB before), {pack['seconds']} s; with the first tagging "
              f"call {pack['peak_with_first_tag_above_bytes'] / GIB:.2f} GiB ({pack['first_tag_seconds']} s)", flush=True)
        if full_load and psutil.virtual_memory().available > total_bytes * 2:
            rows["torch_load"] = run_child("torch_load", ram, dape)
            print(f"rss  plain torch.load(weights_only=True): peak {rows['torch_load']['peak_above_bytes'] / GIB:.2f} GiB "
                  f"above the process, {rows['torch_load']['seconds']} s", flush=True)
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        assert not folder.exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="tag,rss")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when present), cpu or cuda")
    parser.add_argument("--workdir", default=None, help="where the sparse stand-in goes (default: the temp dir)")
    parser.add_argument("--no-full-load", action="store_true", help="skip the plain torch.load comparison")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RAM", "DAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    setup()
    bench_smoke.limit_threads()
    import torch

    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    cases = args.cases.split(",")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "quick": args.quick}
    if "tag" in cases:
        report["tag"] = case_tag(1 if args.quick or bench_smoke.smoke() else args.repeats, devices)
    if "rss" in cases:  # smoke: a stand-in of little more than the needed keys (the plain torch.load still runs)
        total = 1_000_000_000 if bench_smoke.smoke() else 1_500_000_000 if args.quick else RAM_FILE_BYTES
        report["rss"] = case_rss(total, args.workdir, not args.no_full_load)
    if bench_smoke.smoke():
        print(bench_smoke.note())
    if args.json:
        path = bench_smoke.out_path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
