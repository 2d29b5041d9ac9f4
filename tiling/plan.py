"""Tile planning: equal tiles spread evenly over an image, each read with real context around it.

Per axis, every tile has the same core length and the starts are spread evenly, so there are no
thin edge tiles and every overlap is at least the requested one. A tile's *window* (what the model
sees) extends its core by `context` pixels of real neighbouring image on each side; at the image
border the window slides inward instead of padding, so border pixels see exactly what an untiled
pass sees. Only when the image is smaller than the window the model needs (size multiple, minimum)
does the window read past the border, reflected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis of length `length` (input pixels)."""

    length: int
    tile: int  # core length of every tile
    starts: tuple[int, ...]  # core starts
    window: int  # window length the model sees (may exceed `length`: reflected)
    window_starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def min_overlap(self) -> int:
        if self.count < 2:
            return 0
        return min(a + self.tile - b for a, b in zip(self.starts, self.starts[1:]))

    def window_indices(self, i: int) -> torch.Tensor:
        """Source indices of window i, reflected where the window passes the image border."""
        idx = torch.arange(self.window_starts[i], self.window_starts[i] + self.window)
        return reflect_indices(idx, self.length)

    def feathers(self, scale: int) -> list[torch.Tensor]:
        """Normalised 1-D blend weights of every tile's core at output resolution (float64)."""
        raw = [self._raw_feather(i, scale) for i in range(self.count)]
        norm = torch.zeros(self.length * scale, dtype=torch.float64)
        for s, w in zip(self.starts, raw):
            norm[s * scale : (s + self.tile) * scale] += w
        return [w / norm[s * scale : (s + self.tile) * scale] for s, w in zip(self.starts, raw)]

    def _raw_feather(self, i: int, scale: int) -> torch.Tensor:
        """cos^2 (Hann) ramps over the overlap with each neighbour, 1 elsewhere."""
        n = self.tile * scale
        w = torch.ones(n, dtype=torch.float64)
        pos = torch.arange(n, dtype=torch.float64) + 0.5
        if i > 0:
            ramp = (self.starts[i - 1] + self.tile - self.starts[i]) * scale
            if ramp > 0:
                w = torch.minimum(w, torch.sin(0.5 * math.pi * (pos / ramp).clamp(max=1.0)) ** 2)
        if i < self.count - 1:
            ramp = (self.starts[i] + self.tile - self.starts[i + 1]) * scale
            if ramp > 0:
                w = torch.minimum(w, torch.sin(0.5 * math.pi * ((n - pos) / ramp).clamp(max=1.0)) ** 2)
        return w


def reflect_indices(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Mirror indices into [0, length) (numpy 'reflect': the edge pixel is not repeated)."""
    if length == 1:
        return torch.zeros_like(idx)
    period = 2 * (length - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= length, period - idx, idx)


def plan_axis(length: int, tile: int, overlap: int, context: int, multiple: int = 1, minimum: int = 0) -> AxisPlan:
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}: the image must be at least 1x1 pixels")
    multiple = max(1, multiple)
    tile = max(1, min(tile, length))
    if tile + 2 * context >= length:
        tile = length  # the window would cover the whole axis anyway: one tile is cheaper
    if tile < length:
        overlap = max(0, min(overlap, tile - 1))
        count = max(2, math.ceil((length - overlap) / (tile - overlap)))
        # The smallest equal tile that still covers the axis with this count: same tile count,
        # overlaps close to the requested one instead of whatever slack `tile` leaves.
        tile = min(tile, math.ceil((length + (count - 1) * overlap) / count))
        span = length - tile
        starts = tuple(round(i * span / (count - 1)) for i in range(count))
    else:
        starts = (0,)
    window = min(tile + 2 * context, length)
    window = _round_up(max(window, minimum, 1), multiple)
    slack = max(0, length - window)
    window_starts = tuple(min(max(s - (window - tile) // 2, 0), slack) for s in starts)
    return AxisPlan(length, tile, starts, window, window_starts)


@dataclass(frozen=True)
class TilePlan:
    """A grid of equal tiles over an H x W image; tile (r, c) is rows[r] x cols[c]."""

    rows: AxisPlan
    cols: AxisPlan
    requested_tile: int
    overlap: int
    context: int

    @property
    def count(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def untiled(self) -> bool:
        return self.count == 1

    @property
    def window_area_ratio(self) -> float:
        """Pixels the model sees over pixels in the image (1.0 untiled): the geometric floor of a tiled
        run's cost for this plan, which no implementation of the same tiles and overlap avoids."""
        seen = self.count * self.rows.window * self.cols.window
        return seen / (self.rows.length * self.cols.length)

    def tiles(self):
        for r in range(self.rows.count):
            for c in range(self.cols.count):
                yield r, c

    def describe(self) -> dict:
        """What a receipt records."""
        overlaps = [o for o in (self.rows.min_overlap, self.cols.min_overlap) if o]
        return {
            "count": self.count,
            "grid": [self.rows.count, self.cols.count],
            "tile": [self.rows.tile, self.cols.tile],
            "window": [self.rows.window, self.cols.window],
            "overlap": min(overlaps, default=0),
            "context": self.context,
        }

    def blend_weights(self, scale: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-row and per-column normalised feathers; tile (r, c) weighs outer(rows[r], cols[c]).

        The grid is separable, so normalising each axis makes the 2-D weights sum to exactly 1 at
        every output pixel without keeping a full-size weight map.
        """
        return self.rows.feathers(scale), self.cols.feathers(scale)


def plan_tiles(
    height: int,
    width: int,
    tile: int,
    overlap: int,
    context: int = 0,
    multiple: int = 1,
    minimum: int = 0,
    square: bool = False,
) -> TilePlan:
    """Plan tiles of (at most) `tile` x `tile` input pixels; tile <= 0 means one tile."""
    if height < 1 or width < 1:
        raise ValueError(f"image is {width}x{height}: connect an image of at least 1x1 pixels")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    size = max(height, width) if tile <= 0 else tile
    rows = plan_axis(height, size, overlap, context, multiple, minimum)
    cols = plan_axis(width, size, overlap, context, multiple, minimum)
    if square and rows.window != cols.window:
        side = max(rows.window, cols.window)
        rows = plan_axis(height, size, overlap, context, multiple, side)
        cols = plan_axis(width, size, overlap, context, multiple, side)
    return TilePlan(rows, cols, tile, overlap, context)
