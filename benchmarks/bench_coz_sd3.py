#!/usr/bin/env python
"""Benchmark Chain-of-Zoom's SD3 super-resolver on the CPU with the tiny random model (tests/tiny_sd3.py).

* step          -- seconds per SR step at a process size (the zoom loop's unit: a crop, bicubic 4x, one step),
                   the prompt embedding reused within a run and encoded (text encoders included).
* tiled overhead -- a photo upscaled 4x (full-image Chain-of-Zoom), tiled and untiled side by side,
                   interleaved, medians of the repeats, with seconds per stage (forward hooks). Cases:
                     forced   transformer tiles of 64 latent px, overlap 16 (the authors' full-image script)
                              on a 128 px latent;
                     limit    a latent twice a model's window limit on a side (what full-image Chain-of-Zoom
                              meets past SD3's 384 latent px position grid), tiled at the limit -- what auto
                              tiling picks there -- with overlap 16.
                   "untiled" is one transformer call: the tiny model is built with a position grid covering the
                   latent. The VAE runs whole in both (it fits memory). Each case reports the tiled/untiled
                   ratio and the floors that plan cannot go below:
                     window_area_ratio  latent px the transformer sees / latent px (the geometric minimum);
                     run_floor          the whole run's ratio if the tiled transformer cost exactly
                                        window_area_ratio x its untiled time (everything else equal);
                     token_ratio        transformer tokens processed, tiled / untiled: each window also carries
                                        the 589 prompt tokens through every joint block (joint attention mixes
                                        them with the window's pixels, so no tiling of SD3 shares them);
                     flop_ratio         the transformer's FLOPs, tiled / untiled (tokens x width^2 and the
                                        attention's tokens^2 x width): what a compute-bound device would see.
                   sd3_medium_estimate: the same two floors for SD3 medium's own transformer (no run).
                   --memory-short adds the forced case with a memory budget that fits only an 80 latent px VAE
                   window (VAE windows with a subsampled statistics pass).

    .venv/bin/python benchmarks/bench_coz_sd3.py            # forced: photo 256 -> 1024; limit: photo 384 -> 1536
    .venv/bin/python benchmarks/bench_coz_sd3.py --quick    # smaller photos, a smoke run

--threads defaults to 1: on a machine whose cores other work also uses, torch's threads wait on each other
at every barrier and one configuration's time swings many-fold (the same 9 tiles took 4 s and 15 s in one
earlier run); one thread keeps the side-by-side ratios meaningful.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

import bench_smoke  # noqa: E402
import pack_import  # noqa: E402

pack_import.install()

import torch  # noqa: E402
from skimage import data  # noqa: E402

import tiny_sd3  # noqa: E402
from dreamforge_upscale.tiling import RunHooks, plan_tiles  # noqa: E402
from dreamforge_upscale.tiling.memory import BUDGET_FRACTION  # noqa: E402
from dreamforge_upscale.upscalers.contract import Conditioning, RunMemo  # noqa: E402
from dreamforge_upscale.upscalers.coz_sd3 import CoZOptions, CoZSD3Upscaler, TokenizerDirs, step  # noqa: E402

PROMPT_TOKENS = 77 + 512  # CLIP-L/G + T5, as the published encoding pads them
SD3_MEDIUM = {"width": 1536, "layers": 24}


def transformer_flops(image_tokens: float, width: int, layers: int) -> float:
    """Joint blocks: per token 24 w^2 (q, k, v, out, 4w MLP: 12 w^2 multiply-adds), per token pair 4 w
    (QK^T and AV); image and prompt tokens alike. Embeddings and modulation are negligible."""
    n = image_tokens + PROMPT_TOKENS
    return layers * (24 * width**2 * n + 4 * width * n**2)


def flop_ratio(count: int, window: list[int], latent: int, width: int, layers: int) -> float:
    """Tiled / untiled transformer FLOPs: `count` windows of window[0] x window[1] latent px vs one latent^2
    (patch 2: 4 latent px per token)."""
    tiled = count * transformer_flops(window[0] * window[1] / 4, width, layers)
    return tiled / transformer_flops(latent * latent / 4, width, layers)


def sd3_medium_estimate() -> dict:
    """No run: the FLOP ratio and geometric floor of SD3 medium's transformer for the forced plan and for a
    latent twice its 384 px position grid tiled at the grid (overlap 16)."""
    out = {}
    for name, latent, tile in (("forced", 128, 64), ("limit", 768, 384)):
        plan = plan_tiles(latent, latent, tile, 16, context=0, multiple=2)
        out[name] = {"latent": latent, "tile": tile, "grid": [plan.rows.count, plan.cols.count],
                     "window": plan.rows.window, "window_area_ratio": round(plan.window_area_ratio, 3),
                     "flop_ratio": round(flop_ratio(plan.count, [plan.rows.window, plan.cols.window], latent,
                                                    **SD3_MEDIUM), 3)}
    return out


@dataclass(frozen=True)
class Case:
    name: str
    photo: int  # input side in px (the latent side is photo * 4 / 8)
    tile: int  # transformer tile in latent px
    overlap: int


def cases(quick: bool) -> list[Case]:
    if bench_smoke.smoke():  # DREAMFORGE_BENCH_SMOKE=1: the code path only, still 2+ tiles a side
        return [Case("forced", 64, 16, 4), Case("limit", 80, 24, 4)]
    if quick:
        return [Case("forced", 128, 32, 8), Case("limit", 160, 40, 8)]
    return [Case("forced", 256, 64, 16), Case("limit", 384, 96, 16)]


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


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


def photo(side: int) -> torch.Tensor:
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(img, size=(side, side), mode="area")


def step_seconds(model, process: int, repeats: int) -> dict:
    torch.manual_seed(0)
    crop = torch.rand(1, 3, process // 4, process // 4)
    memo = RunMemo()  # one run: the prompt is encoded once, then reused

    def call(prompt: str, run_memo: RunMemo) -> float:
        return timed(lambda: model.upscale_window(crop, Conditioning(prompt, 1, None, run_memo), RunHooks()))[0]

    call("a prompt", memo)  # warm-up, and the embedding the reused calls find
    encoded = [call("a prompt", RunMemo()) for _ in range(repeats)]
    reused = [call("a prompt", memo) for _ in range(repeats)]
    return {"process_size": process, "prompt_reused": statistics.median(reused),
            "prompt_encoded": statistics.median(encoded)}


def median_stages(stages: list[dict]) -> dict:
    return {k: round(statistics.median(s.get(k, 0.0) for s in stages), 3) for k in stages[0]}


def tiled_overhead(model, clock: StageClock, case: Case, repeats: int, memory_short: bool) -> dict:
    image = photo(case.photo)
    configs = {"untiled": (CoZOptions(tile=10**6), RunHooks()),
               "tiled": (CoZOptions(tile=case.tile, overlap=case.overlap), RunHooks())}
    if memory_short:
        window = 80 if case.tile >= 64 else 48
        budget = window**2 * step.vae_bytes_per_latent_px(model.comps.vae, torch.float32) / BUDGET_FRACTION
        configs["memory_short"] = (configs["tiled"][0], RunHooks(free_bytes=lambda device: int(budget)))
    seconds, stages, outputs, reports = defaultdict(list), defaultdict(list), {}, {}
    for _ in range(repeats):  # interleaved: load drifts hit every configuration alike
        for name, (opts, hooks) in configs.items():
            clock.take()
            cond = Conditioning("astronaut", 2, opts, RunMemo())
            took, result = timed(lambda: model.upscale_window(image, cond, hooks))
            per_stage = clock.take()
            seconds[name].append(took)
            stages[name].append(per_stage)
            outputs[name], reports[name] = result.image, result.report
    base = statistics.median(seconds["untiled"])
    base_transformer = median_stages(stages["untiled"])["transformer"]
    latent = case.photo * step.ZOOM // 8
    config = model.comps.transformer.config
    dims = {"width": config.num_attention_heads * config.attention_head_dim, "layers": config.num_layers}
    out = {"photo": case.photo, "latent": latent, "tile": case.tile, "overlap": case.overlap}
    for name in configs:
        median = statistics.median(seconds[name])
        plan = reports[name]["transformer_tiles"]
        geo = plan["window_area_ratio"]
        px_per_token = 4  # patch 2
        tokens = plan["count"] * (plan["window"][0] * plan["window"][1] / px_per_token + PROMPT_TOKENS)
        diff = (outputs[name] - outputs["untiled"]).abs()
        stage = median_stages(stages[name])
        out[name] = {
            "seconds": round(median, 3), "all_seconds": [round(s, 3) for s in seconds[name]],
            "ratio_to_untiled": round(median / base, 3),
            "stage_seconds": stage,
            "transformer_ratio": round(stage["transformer"] / base_transformer, 3),
            "transformer_grid": plan["grid"], "transformer_window": plan["window"],
            "tiles_per_call": plan["tiles_per_call"],
            "window_area_ratio": geo,
            "run_floor": round((base + base_transformer * (geo - 1)) / base, 3),
            "token_ratio": round(tokens / (latent * latent / px_per_token + PROMPT_TOKENS), 3),
            "flop_ratio": round(flop_ratio(plan["count"], plan["window"], latent, **dims), 3),
            "vae_tiles": [reports[name]["vae_encode_tiles"]["count"], reports[name]["vae_decode_tiles"]["count"]],
            "vae_statistics": reports[name]["vae_decode_tiles"]["statistics"],
            "mean_abs_diff_to_untiled": round(float(diff.mean()), 4),
            "max_abs_diff_to_untiled": round(float(diff.max()), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-short", action="store_true")
    ap.add_argument("--skip-step", action="store_true", help="only the tiled-overhead cases")
    ap.add_argument("--case", action="append", choices=("forced", "limit"), help="only these cases (default: both)")
    args = ap.parse_args()
    if bench_smoke.smoke():
        args.repeats = 1
    torch.set_num_threads(1 if bench_smoke.smoke() else args.threads)
    chosen = [c for c in cases(args.quick) if not args.case or c.name in args.case]
    largest = max(c.photo for c in chosen) * step.ZOOM // 8
    root = Path(tempfile.mkdtemp(prefix="bench-coz-"))
    lora = tiny_sd3.write_lora_files(root / "lora")
    folder = tiny_sd3.write_diffusers_folder(root / "sd3", pos_max=largest // 2)  # untiled = one call
    model = CoZSD3Upscaler.load(folder, lora["transformer"], lora["vae"], device=torch.device("cpu"),
                                tokenizer_dirs=TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir()))
    clock = StageClock(transformer=model.comps.transformer, vae_encoder=model.comps.vae.encoder,
                       vae_decoder=model.comps.vae.decoder)
    results: dict = {"threads": torch.get_num_threads(), "repeats": args.repeats,
                     "sd3_medium_estimate": sd3_medium_estimate()}
    with torch.inference_mode():
        if not args.skip_step:
            process = 64 if bench_smoke.smoke() else 128 if args.quick else 256
            results["step_seconds"] = step_seconds(model, process, args.repeats)
        results["tiled_overhead"] = {c.name: tiled_overhead(model, clock, c, args.repeats, args.memory_short)
                                     for c in chosen}
    print(json.dumps(results, indent=1))
    if bench_smoke.smoke():
        print(bench_smoke.note())


if __name__ == "__main__":
    main()
