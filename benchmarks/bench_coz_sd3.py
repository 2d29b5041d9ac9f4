#!/usr/bin/env python
"""Benchmark Chain-of-Zoom's SD3 super-resolver on the CPU with the tiny random model (tests/tiny_sd3.py).

* step      -- seconds per SR step at a process size (the zoom loop's unit: a crop, bicubic 4x, one step),
               prompt embeddings cached (as in a loop with one prompt) and not (text encoders included).
* full image -- a photo upscaled 4x untiled vs with transformer latent tiles (default overlap 16) and
               tiled VAE encode/decode: seconds, per-tile seconds, tiled/untiled ratio. Medians of
               interleaved repeats. The tiny model's attention cost is small next to its VAE, so the
               ratio mostly measures the tile overlap and the VAE windows' padding.

    .venv/bin/python benchmarks/bench_coz_sd3.py            # process size 256, photo 256 -> 1024
    .venv/bin/python benchmarks/bench_coz_sd3.py --quick    # smaller, a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402
from skimage import data  # noqa: E402

import tiny_sd3  # noqa: E402
from dreamforge_upscale.upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler, TokenizerDirs  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    process, photo = (128, 64) if args.quick else (256, 256)
    root = Path(tempfile.mkdtemp(prefix="bench-coz-"))
    lora = tiny_sd3.write_lora_files(root / "lora")
    model = CoZSD3Upscaler.load(tiny_sd3.write_diffusers_folder(root / "sd3"), lora["transformer"], lora["vae"],
                                device=torch.device("cpu"),
                                tokenizer_dirs=TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir()))
    torch.manual_seed(0)
    crop = torch.rand(1, 3, process // 4, process // 4)
    image = torch.from_numpy(data.astronaut()[::512 // photo, ::512 // photo].copy()).permute(2, 0, 1)[None].float() / 255
    results: dict = {"process_size": process, "photo": list(image.shape[-2:]), "threads": torch.get_num_threads()}

    with torch.inference_mode():
        model.upscale_window(crop, prompt="warm-up", seed=0)
        encoded = [timed(lambda i=i: model.upscale_window(crop, prompt=f"a new prompt {i}", seed=1))
                   for i in range(args.repeats)]
        cached = [timed(lambda: model.upscale_window(crop, prompt="a new prompt 0", seed=1)) for _ in range(args.repeats)]
        results["step_seconds"] = {"prompt_cached": statistics.median(cached), "prompt_encoded": statistics.median(encoded)}
        # Latent of the 4x photo is photo/2 px; tiles of 64 latent px (512 image px, the training size),
        # overlap 16 (the authors' full-image script); VAE windows of 64 latent px + 8 px of context.
        tiled_opts = CoZOptions(tile=64 if not args.quick else 16, overlap=16 if not args.quick else 4,
                               vae_tile=64 if not args.quick else 16)
        untiled_opts = CoZOptions(tile=10**6, vae_tile=10**6)
        untiled, tiled, report = [], [], {}
        for _ in range(args.repeats):  # interleaved: load drifts hit both alike
            untiled.append(timed(lambda: model.upscale_window(image, prompt="astronaut", seed=2, options=untiled_opts)))
            tiled.append(timed(lambda: model.upscale_window(image, prompt="astronaut", seed=2, options=tiled_opts,
                                                             report=report)))
    count = report["transformer_tiles"]["count"]
    results["full_image_4x"] = {
        "untiled_seconds": statistics.median(untiled), "tiled_seconds": statistics.median(tiled),
        "ratio": statistics.median(tiled) / statistics.median(untiled),
        "transformer_tiles": report["transformer_tiles"], "vae_decode_tiles": report["vae_decode_tiles"]["count"],
        "vae_encode_tiles": report["vae_encode_tiles"]["count"], "seconds_per_transformer_tile_incl_vae":
            statistics.median(tiled) / count,
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
