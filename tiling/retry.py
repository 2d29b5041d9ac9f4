"""The one out-of-memory retry every tiled loop uses (GAN tiles, SD x4 UNet tiles, VAE decode tiles,
the decode's statistics pass).

On out-of-memory the size is halved and the work retried, but only while the memory the new attempt
needs actually shrinks: a planner may turn a halved tile back into the whole axis (small images,
strips), and retrying the same plan would loop forever. When the size cannot shrink any further, or
passes the floor, the run stops with a TileOOMError that carries the allocator's own message and
every size tried. Whatever the caller finished before the failing stage (earlier passes, earlier
denoising steps) is untouched: only the failing call is retried.
"""
from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

if TYPE_CHECKING:  # for annotations only
    from .plan import TilePlan

T = TypeVar("T")


class TileOOMError(RuntimeError):
    """Out of memory even at the smallest size a stage can run at."""

    def __init__(self, message: str, *, stage: str = "", tried: tuple[int, ...] = (), allocator: str = ""):
        super().__init__(message)
        self.stage, self.tried, self.allocator = stage, tried, allocator


def is_out_of_memory(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    if isinstance(exc, TileOOMError):
        return False  # already final: a nested stage gave up, do not retry it from outside
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError) + tuple(extra)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def allocator_message(exc: BaseException) -> str:
    """The allocator's first line ("tried to allocate 2.00 GiB ..."), or the exception type when empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def free_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "cpu":
        from ..runtime.cpu_allocator import release_for_retry

        release_for_retry()  # the retries run with glibc's defaults: no heap reuse once memory ran out


def shrink_on_oom(
    attempt: Callable[[int], T],
    size: int,
    *,
    cost: Callable[[int], int],
    floor: int,
    stage: str,
    device: torch.device,
    retries: list[dict],
    oom_errors: tuple[type[BaseException], ...] = (),
    fix: str = "lower 'tile', choose dtype fp16/bf16, free memory used by other models, or use a smaller image",
    record: dict | None = None,
) -> T:
    """Run attempt(size); on out-of-memory halve `size` and retry while cost(size) strictly drops.

    `cost(size)`: what the attempt at `size` would hold in memory (e.g. the pixels of one tile window).
    `retries` receives one entry per retry: {"event", "stage", "tile", "retry_tile", "allocator"} (+ `record`).
    """
    tried: list[int] = []
    while True:
        try:
            return attempt(size)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried, the rest re-raised
            if not is_out_of_memory(exc, oom_errors):
                raise
            message = allocator_message(exc)
        free_cache(device)  # the failed attempt's tensors are unreachable once `exc` is gone
        current = cost(size)
        tried.append(size)
        smaller = size // 2
        while smaller >= floor and cost(smaller) >= current:
            smaller //= 2  # a halving the planner undoes (whole-axis tiles) needs no retry of its own
        if smaller < floor:
            sizes = ", ".join(str(s) for s in tried)
            raise TileOOMError(
                f"out of memory in {stage} even at the smallest size it can run at (tried {sizes}; allocator: "
                f"{message}). Fix: {fix}.",
                stage=stage, tried=tuple(tried), allocator=message,
            ) from None
        retries.append({"event": "out_of_memory", "stage": stage, "tile": size, "retry_tile": smaller,
                        "allocator": message, **(record or {})})
        size = smaller
def shrink_plan_on_oom(plan_for: Callable[[int], "TilePlan"], run: Callable[["TilePlan"], T], size: int,
                       **retry) -> T:
    """shrink_on_oom over tile plans: run(plan_for(size)); on out-of-memory the plan of a halved size, while its
    windows shrink (`retry`: shrink_on_oom's floor, stage, device, retries, oom_errors...)."""
    def window_pixels(s: int) -> int:
        plan = plan_for(s)
        return plan.rows.window * plan.cols.window

    return shrink_on_oom(lambda s: run(plan_for(s)), size, cost=window_pixels, **retry)


