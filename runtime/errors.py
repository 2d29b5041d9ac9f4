"""The errors every part of the pack raises for problems a user can fix."""
from __future__ import annotations


class UpscalerError(ValueError):
    """A problem the user can fix; the message names the input and what was expected."""


class AssetError(UpscalerError):
    """A model asset problem (missing, unreachable, corrupted, bad manifest); the message names the fix."""


def error_text(exc: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' for an error message of our own; safe for empty messages."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
