"""Progress over images on stderr: a redrawn bar on a terminal (moving per tile too), plain lines otherwise
(logs, pipes, CI), so a batch of thousands never floods a terminal and a log still says what happened."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

BAR_WIDTH = 24


def shown(text: object) -> str:
    """`text` safe for one terminal line: control and other unprintable characters (newline, ESC, an
    undecodable byte of a file name) escaped as repr writes them, so a file name cannot split a progress or
    summary line or drive the terminal. Every path and reason the command line prints goes through here."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


@dataclass
class Outcome:
    """What became of one input."""

    source: str
    output: str | None
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""
    seconds: float = 0.0


class Progress:
    def __init__(self, total: int, label: str = "upscale", stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.label, self.count = total, label, 0
        self.started = time.perf_counter()
        self._current = ""

    def start(self, name: str) -> None:
        self._current = shown(name)
        if self.tty:
            self._draw(0.0)

    def tile(self, done: int, total: int) -> None:
        if self.tty and total > 1:
            self._draw(done / total)

    def finished(self, outcome: Outcome) -> None:
        self.count += 1
        if self.tty:
            if outcome.status == "failed":  # keep failures visible above the bar
                self.stream.write(f"\r\x1b[2Kfailed: {shown(outcome.source)}: {shown(outcome.reason)}\n")
            self._draw(0.0)
            return
        detail = {"done": f" -> {shown(outcome.output)} ({outcome.seconds:.2f} s)",
                  "skipped": f" ({shown(outcome.reason)})", "failed": f": {shown(outcome.reason)}"}[outcome.status]
        self.stream.write(f"[{self.count}/{self.total}] {outcome.status} {shown(outcome.source)}{detail}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, fraction: float) -> None:
        done = self.count + fraction
        filled = int(BAR_WIDTH * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        rate = f"{self.count / elapsed * 60:.1f} img/min" if self.count and elapsed > 0 else ""
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\r\x1b[2K{self.label} [{bar}] {self.count}/{self.total} {rate} {self._current}")
        self.stream.flush()


def summarize(outcomes: list[Outcome], stream=None) -> int:
    """The final summary (stdout); the exit status: 0 when nothing failed, 1 otherwise."""
    stream = stream or sys.stdout
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    stream.write(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']} "
                 f"(of {len(outcomes)})\n")
    for o in outcomes:
        if o.status == "failed":
            stream.write(f"failed: {shown(o.source)}: {shown(o.reason)}\n")
    stream.flush()
    return 1 if counts["failed"] else 0
