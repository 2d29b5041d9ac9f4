"""`upscale ... --ray [ADDRESS]`: the same jobs on a Ray cluster through Ray Data (pip install .[cluster]).

The images are read as a dataset (`read_binary_files`), and `map_batches` sends them to an actor
pool: each actor loads the model once (one GPU per actor where the cluster has GPUs) and runs
`process_one` - the function the local run uses - which writes the output and its receipt from the
worker. Per-image failures come back as rows; the driver only reports. Ray does the scheduling,
retries of lost workers and back-pressure; this module adds none of its own.

Workers import this pack by the same name as the driver, from the driver's import root (put on
their PYTHONPATH), so a checkout works without installing; on a multi-machine cluster install the
pack on every node (or share the folder) and keep inputs and --out on storage every node sees.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..api import resolve_model
from ..assets.bundled_model import BUNDLED_MODEL
from ..runtime.errors import UpscalerError
from .images import Job
from .progress import Outcome, Progress
from .upscale_jobs import UpscaleConfig, process_one

COLUMNS = ("source", "output", "status", "reason", "seconds")


def _key(path: str) -> str:
    """Ray reports paths as its filesystem layer sees them; compare real absolute paths."""
    return os.path.realpath(path if os.path.isabs(path) else os.sep + path)


class UpscaleActor:
    """One loaded model per actor; called with batches of {"path", "bytes"} rows."""

    def __init__(self, cfg: UpscaleConfig, jobs: dict[str, tuple[str, str]]):
        self.cfg = cfg
        self.jobs = {k: Job(Path(k), Path(out), Path(receipt)) for k, (out, receipt) in jobs.items()}
        self.upscaler, self.policy = cfg.load()

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        for path, data in zip(batch["path"], batch["bytes"]):
            job = self.jobs[_key(str(path))]
            outcome = process_one(self.upscaler, self.policy, job, self.cfg, data=bytes(data))
            for c in COLUMNS:
                value = getattr(outcome, c)
                rows[c].append(value if value is not None else "")
        return {c: np.asarray(v, dtype=np.float64 if c == "seconds" else object) for c, v in rows.items()}


def _import_root() -> str:
    """The folder the driver imports this pack from (its package's parent), for the workers' PYTHONPATH."""
    top = __name__.split(".")[0]
    return os.path.dirname(os.path.abspath(list(sys.modules[top].__path__)[0]))


def _connect(ray, address: str) -> bool:
    """Join (or start) a cluster; True when this call started the connection (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"address": address} if address else {}
    ray.init(**kwargs, include_dashboard=False, logging_level=logging.WARNING)
    return True


def run_on_ray(jobs: list[Job], cfg: UpscaleConfig, *, address: str, actors: int, progress: Progress,
               outcomes: list[Outcome]) -> None:
    """Run `jobs` on the cluster, appending an Outcome per image to `outcomes` as results arrive."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UpscalerError("--ray needs Ray Data: pip install 'dreamforge-upscale[cluster]' (or pip install "
                            "'ray[data]'), or run without --ray") from None
    if actors < 0:
        raise UpscalerError(f"--actors must be 0 (one per GPU, else 1) or more; got {actors}")
    resolve_model(cfg.model or BUNDLED_MODEL, cfg.places())  # a missing model fails here, not in every actor
    started = _connect(ray, address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        size = actors or max(gpus, 1)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the pack's own progress (per image) is shown instead
        table = {_key(str(j.source)): (str(j.output), str(j.receipt)) for j in jobs}
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [_import_root(), os.environ.get("PYTHONPATH")]))}}
        # reading is I/O: on a CPU-only cluster the actors hold every CPU, and reads asking for one would wait forever
        ds = ray.data.read_binary_files([str(j.source) for j in jobs], include_paths=True, num_cpus=0)
        results = ds.map_batches(UpscaleActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                                 fn_constructor_kwargs={"cfg": cfg, "jobs": table}, runtime_env=env, **resources)
        for row in results.iter_rows():
            outcome = Outcome(str(row["source"]), str(row["output"]) or None, str(row["status"]), str(row["reason"]),
                              float(row["seconds"]))
            outcomes.append(outcome)
            progress.finished(outcome)
    finally:
        if started:
            ray.shutdown()
