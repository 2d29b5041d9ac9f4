"""One upscale job (an image file in, a PNG and its receipt out) and the settings it is made with.

`process_one` is what a local run and each Ray worker call, so both write the same bytes.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..api import ModelPlaces, folder_gan, plan_upscaler, select_upscaler, upscale_image
from ..assets import discovery
from ..assets.download import tree_sha256
from ..assets.hashing import sha256_of
from ..imaging.image_io import encode_png, read_image
from ..runtime.errors import UpscalerError
from ..upscalers import model_files
from ..upscalers.contract import Upscaler
from ..upscalers.receipts import Policy
from ..upscalers.request import DEFAULT_OVERLAP
from ..upscalers.sdx4 import SDX4Options
from ..upscalers.size_guard import check_request
from .images import Job, sha256_bytes, unfinished_reason, write_atomic
from .progress import Outcome, Progress

TOOL = "dreamforge-upscale"


@dataclass(frozen=True)
class UpscaleConfig:
    """Everything a worker needs to make an output: picklable, so it travels to Ray actors as is."""

    scale: float = 4.0
    model: str | None = None
    impl: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    tile: int = 0
    overlap: int = DEFAULT_OVERLAP
    resample: str = "lanczos"
    prompt: str | None = None
    negative_prompt: str = ""
    seed: int | None = None
    steps: int = 50
    guidance: float = 7.5
    noise_level: int = 20
    models_root: str | None = None
    comfyui_root: str | None = None
    mirror: str | None = None
    clip_tokenizer: str | None = None
    skip_existing: bool = False
    model_sha256: str | None = None  # set once per run by cmd_upscale (None: model_identity() on demand)

    def places(self) -> ModelPlaces:
        return ModelPlaces(self.models_root, self.comfyui_root, self.mirror)

    def settings(self) -> dict:
        """What decides an output's pixels: a resumed run skips an output only when these match its receipt.

        The model is its weights' SHA-256, not the name typed (new weights behind the same path are another
        model); every option that changes pixels is recorded, the device as given (auto stays auto: a Ray head
        without a GPU and its GPU workers agree), the folders models are found in and the tokenizer resolved.
        """
        keys = ("scale", "impl", "dtype", "tile", "overlap", "resample", "prompt", "negative_prompt", "seed", "steps",
                "guidance", "noise_level")
        places = self.places()
        mirror = discovery.mirror_dir(self.mirror)
        return {"model_sha256": self.model_sha256 or model_identity(self), **{k: getattr(self, k) for k in keys},
                "device": self.device,
                "models_root": str(discovery.models_root(self.models_root)),
                "comfyui_models": _path_text(places.comfy_models()), "mirror": _path_text(mirror),
                "clip_tokenizer": _path_text(self.clip_tokenizer)}

    def sdx4(self) -> SDX4Options:
        return SDX4Options(steps=self.steps, guidance=self.guidance, noise_level=self.noise_level,
                           negative_prompt=self.negative_prompt)

    def load(self) -> tuple[Upscaler, Policy]:
        return select_upscaler(self.scale, self.model, impl=self.impl, dtype=self.dtype, device=self.device,
                               places=self.places(), tokenizer_dir=self.clip_tokenizer)


def _path_text(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def planned_model(cfg: UpscaleConfig) -> Path:
    """The weights cfg.load() will load, found without loading anything: select_upscaler's choice (the
    model given, or the GAN from the model folders that the impl policy runs instead of SD x4)."""
    places = cfg.places()
    path, choice = plan_upscaler(cfg.scale, cfg.model, impl=cfg.impl, places=places)
    if choice.use_loaded:
        return path
    return model_files.folder_gan_path(choice.gan_scale, places.locations())


def model_identity(cfg: UpscaleConfig) -> str:
    """SHA-256 of the weights that make the pixels: the file's, or for a diffusers folder one hash over
    its files' (download.tree_sha256). Hashes are cached per file version (path, size, mtime)."""
    path = planned_model(cfg)
    if path.is_dir():
        return tree_sha256({p.relative_to(path).as_posix(): sha256_of(p) for p in sorted(path.rglob("*"))
                            if p.is_file()})
    return sha256_of(path)


def process_one(upscaler: Upscaler, policy: Policy, job: Job, cfg: UpscaleConfig, data: bytes | None = None,
                progress=None) -> Outcome:
    """Read, upscale, write the image, then its receipt. Never raises for a bad image: it is an Outcome."""
    started = time.perf_counter()
    try:
        raw = data if data is not None else job.source.read_bytes()
        # the size guard sees the header first: a huge image it refuses anyway is never decoded
        image = read_image(raw, label=str(job.source),
                           check=lambda w, h, c: check_request(upscaler, w, h, c, cfg.scale))
        def fallback():  # what a diffusion model out of memory at the smallest tiles falls back to (the driver decides)
            return folder_gan(4, dtype=cfg.dtype, device=cfg.device, places=cfg.places())

        result = upscale_image(upscaler, image, cfg.scale, tile=cfg.tile, overlap=cfg.overlap, resample=cfg.resample,
                               prompt=cfg.prompt, seed=cfg.seed, sdx4=cfg.sdx4(), device=cfg.device,
                               progress=progress, fallback=fallback, policy=policy)
        png = encode_png(result.image)
        receipt = dataclasses.replace(result.receipt, cli={
            "tool": TOOL, "input": str(job.source), "input_sha256": sha256_bytes(raw), "output": job.output.name,
            "output_sha256": sha256_bytes(png), "settings": cfg.settings(),
        })
        write_atomic(job.output, png)  # image first, receipt last: the receipt says the output is complete
        write_atomic(job.receipt, receipt.to_json().encode())
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop a folder of thousands
        reason = str(exc) if isinstance(exc, (UpscalerError, OSError)) else f"{type(exc).__name__}: {exc}"
        reason = reason.removeprefix(f"{job.source}: ")  # the summary names the file already
        return Outcome(str(job.source), None, "failed", reason[:500], time.perf_counter() - started)
    return Outcome(str(job.source), str(job.output), "done", seconds=time.perf_counter() - started)


def split_finished(jobs: list[Job], cfg: UpscaleConfig, progress: Progress) -> tuple[list[Job], list[Outcome]]:
    """With --skip-existing: the jobs still to run, and an Outcome for each one finished by an earlier run."""
    if not cfg.skip_existing:
        return jobs, []
    pending, skipped = [], []
    settings = cfg.settings()
    for job in jobs:
        reason = unfinished_reason(job, settings)
        if reason is None:
            outcome = Outcome(str(job.source), str(job.output), "skipped", "already done")
            skipped.append(outcome)
            progress.finished(outcome)
        else:
            pending.append(job)
    return pending, skipped


def run_local(jobs: list[Job], cfg: UpscaleConfig, progress: Progress, outcomes: list[Outcome]) -> None:
    """Run `jobs` here, one at a time, appending an Outcome per image to `outcomes`."""
    upscaler = policy = None  # loaded on the first image that needs it: a finished folder loads nothing
    for job in jobs:
        if upscaler is None:
            upscaler, policy = cfg.load()
        progress.start(job.source.name)
        outcome = process_one(upscaler, policy, job, cfg, progress=progress.tile)
        outcomes.append(outcome)
        progress.finished(outcome)
