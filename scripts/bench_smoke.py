"""Smoke mode and an output folder for the benchmark and maintenance scripts the docs tell a user to run.

tests/test_doc_commands.py runs every command README.md and docs/ show, unchanged, so that a documented
command that drifted from its script (a renamed option, a moved import) fails the suite. A benchmark run
as written takes minutes to an hour and writes into the checkout, so the test sets two variables:

* DREAMFORGE_BENCH_SMOKE=1 -- the script runs its own real code path at tiny sizes (numbers mean nothing;
  verdicts and goals are printed but do not decide the exit status: 0 when the code path ran);
* DREAMFORGE_BENCH_OUT=DIR -- files the command would write into the checkout (its --json path, example
  workflows and thumbnails, docs/receipt.schema.json, out/...) go to DIR/<same file name> instead.

This module is the one place that reads them; the scripts ask `smoke()`, `capped()`, `limit_threads()`
and `out_path()`.
"""
from __future__ import annotations

import os
from pathlib import Path

SMOKE_ENV = "DREAMFORGE_BENCH_SMOKE"
OUT_ENV = "DREAMFORGE_BENCH_OUT"


def smoke() -> bool:
    """True when DREAMFORGE_BENCH_SMOKE is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def capped(value: int, tiny: int) -> int:
    """`value`, or at most `tiny` in smoke mode (a size, a count of repeats, blocks or sides)."""
    return min(value, tiny) if smoke() else value


def limit_threads() -> None:
    """In smoke mode, one torch thread: on tiny tensors, and on cores other jobs share, the threads' wake-ups
    and barriers cost more than the work (a one-step 48 px SD x4 denoise took 12 s with 2 threads at load 6)."""
    if smoke():
        import torch

        torch.set_num_threads(1)


def out_dir() -> Path | None:
    """DREAMFORGE_BENCH_OUT as a folder (created), or None when it is not set."""
    folder = os.environ.get(OUT_ENV, "").strip()
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def out_path(path: str | os.PathLike) -> Path:
    """Where a file the script writes goes: DIR/<its name> when DREAMFORGE_BENCH_OUT=DIR is set, else `path`
    unchanged (its parent folder is the caller's business)."""
    path = Path(path)
    folder = out_dir()
    return path if folder is None else folder / path.name


def note() -> str:
    """A line for the script's report: '' normally, what the numbers mean in smoke mode."""
    return (f"({SMOKE_ENV}=1: the code path at tiny sizes; the numbers and verdicts mean nothing)"
            if smoke() else "")
