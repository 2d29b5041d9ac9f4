#!/usr/bin/env python
"""Benchmark Chain-of-Zoom's SD3 super-resolver on the CPU with the tiny random model (tests/tiny_sd3.py).

* step       -- seconds per SR step at a process size (the zoom loop's unit: a crop, bicubic 4x, one step),
                prompt embeddings cached (as in a loop with one prompt) and not (text encoders included).
* full image -- a photo upscaled 4x three ways, medians of interleaved repeats, with seconds per stage
                (transformer, VAE encoder, VAE decoder: forward hooks):
                  untiled      one transformer call (the tiny model is built with a position grid that
                               covers the latent, as SD3's 384 latent px cover 3072 px) and whole VAE passes;
                  tiled        transformer latent tiles of 64 with overlap 16 (the authors' full-image
                               script), VAE auto (whole: it fits memory) -- the full-image Chain-of-Zoom;
                  memory short the same with a memory budget that only fits an 80 latent px VAE window, so
                               the VAE runs in windows with a (subsampled) statistics pass.

    .venv/bin/python benchmarks/bench_coz_sd3.py            # process size 256, photo 256 -> 1024 (latent 128)
    .venv/bin/python benchmarks/bench_coz_sd3.py --quick    # photo 128 -> 512, a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402
from skimage import data  # noqa: E402

import tiny_sd3  # noqa: E402
from dreamforge_upscale.tiling import RunHooks  # noqa: E402
from dreamforge_upscale.tiling.memory import BUDGET_FRACTION  # noqa: E402
from dreamforge_upscale.upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler, TokenizerDirs, step  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class StageClock:
    """Seconds spent inside each named module's forward (accumulated until read)."""

    def __init__(self, **modules: torch.nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda *_, n=name: self.seconds.__setitem__(f"_{n}", time.perf_counter()))
            module.register_forward_hook(lambda *_, n=name: self._stop(n))

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self.seconds.pop(f"_{name}")

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    process, photo, tile, overlap, window = (128, 128, 32, 8, 48) if args.quick else (256, 256, 64, 16, 80)
    latent = photo * step.ZOOM // 8
    root = Path(tempfile.mkdtemp(prefix="bench-coz-"))
    lora = tiny_sd3.write_lora_files(root / "lora")
    folder = tiny_sd3.write_diffusers_folder(root / "sd3", pos_max=latent // 2)
    model = CoZSD3Upscaler.load(folder, lora["transformer"], lora["vae"], device=torch.device("cpu"),
                                tokenizer_dirs=TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir()))
    vae = model.comps.vae
    clock = StageClock(transformer=model.comps.transformer, vae_encoder=vae.encoder, vae_decoder=vae.decoder)
    torch.manual_seed(0)
    crop = torch.rand(1, 3, process // 4, process // 4)
    image = torch.from_numpy(data.astronaut()[::512 // photo, ::512 // photo].copy()).permute(2, 0, 1)[None].float() / 255
    results: dict = {"process_size": process, "photo": list(image.shape[-2:]), "latent": latent,
                     "threads": torch.get_num_threads()}
    window_budget = window**2 * step.vae_bytes_per_latent_px(vae, torch.float32) / BUDGET_FRACTION
    configs = {
        "untiled": (CoZOptions(tile=10**6), RunHooks()),
        "tiled": (CoZOptions(tile=tile, overlap=overlap), RunHooks()),
        "memory_short": (CoZOptions(tile=tile, overlap=overlap), RunHooks(free_bytes=lambda device: int(window_budget))),
    }

    with torch.inference_mode():
        model.upscale_window(crop, prompt="warm-up", seed=0)
        encoded = [timed(lambda i=i: model.upscale_window(crop, prompt=f"a new prompt {i}", seed=1))
                   for i in range(args.repeats)]
        cached = [timed(lambda: model.upscale_window(crop, prompt="a new prompt 0", seed=1)) for _ in range(args.repeats)]
        results["step_seconds"] = {"prompt_cached": statistics.median(cached), "prompt_encoded": statistics.median(encoded)}
        clock.take()
        runs: dict = {name: {"seconds": [], "stages": []} for name in configs}
        outputs, reports = {}, {}
        for _ in range(args.repeats):  # interleaved: load drifts hit every configuration alike
            for name, (opts, hooks) in configs.items():
                reports[name] = {}
                runs[name]["seconds"].append(timed(lambda: outputs.__setitem__(name, model.upscale_window(
                    image, prompt="astronaut", seed=2, options=opts, hooks=hooks, report=reports[name]))))
                runs[name]["stages"].append(clock.take())
    base = statistics.median(runs["untiled"]["seconds"])
    full = {}
    for name, run in runs.items():
        seconds = statistics.median(run["seconds"])
        report = reports[name]
        full[name] = {
            "seconds": seconds, "ratio_to_untiled": seconds / base,
            "stage_seconds": {k: statistics.median(s[k] for s in run["stages"]) for k in run["stages"][0]},
            "transformer_tiles": report["transformer_tiles"]["count"],
            "vae_encode_tiles": report["vae_encode_tiles"]["count"], "vae_decode_tiles": report["vae_decode_tiles"]["count"],
            "vae_statistics": report["vae_decode_tiles"]["statistics"],
            "seconds_per_transformer_tile": (statistics.median(s["transformer"] for s in run["stages"])
                                             / report["transformer_tiles"]["count"]),
            "mean_abs_diff_to_untiled": float((outputs[name] - outputs["untiled"]).abs().mean()),
        }
    results["full_image_4x"] = full
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
