"""`upscale INPUT... --scale S`: every image of files, folders and globs, with a receipt beside each.

Jobs run one at a time here (`upscale_jobs.run_local`) or on Ray actors (`ray_batch.run_on_ray`); a bad image
is reported and the rest go on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

from ..runtime.errors import UpscalerError
from .images import plan_jobs
from .progress import Outcome, Progress, shown, summarize
from .ray_batch import run_on_ray
from .upscale_jobs import UpscaleConfig, model_identity, run_local, split_finished


def config_from_args(args) -> UpscaleConfig:
    return UpscaleConfig(**{k: getattr(args, k) for k in asdict(UpscaleConfig()) if hasattr(args, k)})


def cmd_upscale(args) -> int:
    cfg = config_from_args(args)
    if not (cfg.scale > 0):
        raise UpscalerError(f"--scale must be a positive number; got {cfg.scale}")
    jobs, unmatched = plan_jobs(args.inputs, args.out, cfg.scale)
    outcomes = [Outcome(u.input, None, "failed", u.reason) for u in unmatched]
    progress = Progress(len(jobs) + len(unmatched))
    for outcome in outcomes:
        progress.finished(outcome)
    if jobs:  # the model's identity once per run (hashing its weights), not once per image
        cfg = dataclasses.replace(cfg, model_sha256=model_identity(cfg))
    pending, skipped = split_finished(jobs, cfg, progress)
    outcomes += skipped
    try:
        if args.ray is not None and pending:
            run_on_ray(pending, cfg, address=args.ray, actors=args.actors, progress=progress, outcomes=outcomes)
        else:
            run_local(pending, cfg, progress, outcomes)
    except KeyboardInterrupt:
        progress.close()
        summarize(outcomes)
        print(f"interrupted after {len(outcomes)} of {len(jobs) + len(unmatched)}: rerun with --skip-existing to "
              "resume", flush=True)
        return 130
    order = {str(j.source): i for i, j in enumerate(jobs)}
    outcomes.sort(key=lambda o: order.get(o.source, -1))  # the summary in input order, whatever finished first
    progress.close()
    print(f"outputs in {shown(Path(args.out).expanduser().resolve())}")
    return summarize(outcomes)
