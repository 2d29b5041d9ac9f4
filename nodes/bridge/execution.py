"""Running under the server: its devices, interrupts, progress bars and the preview frames that follow its
`--preview-method`."""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args as cli_args

from ...imaging.image_io import to_pil


def device() -> torch.device:
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def to_output(image: torch.Tensor) -> torch.Tensor:
    """Where ComfyUI keeps IMAGE tensors between nodes."""
    return image.to(mm.intermediate_device())


check_interrupt = mm.throw_exception_if_processing_interrupted


def previews_enabled() -> bool:
    """Core sends preview frames only when the server runs with --preview-method (not 'none'); API
    clients that collect streamed images rely on that."""
    return cli_args.preview_method != LatentPreviewMethod.NoPreviews


def preview_frame(image) -> tuple:
    """The preview tuple ComfyUI 0.3.75's progress hook sends: (format, PIL image, max side)."""
    pil = to_pil(image[:1]) if isinstance(image, torch.Tensor) else image
    side = cli_args.preview_size
    if max(pil.size) > 2 * side:
        pil = pil.copy()
        pil.thumbnail((2 * side, 2 * side))
    return ("JPEG", pil, min(side, max(pil.size)))  # the server's ImageOps.contain would also enlarge


class Progress:
    """ComfyUI progress bars for one node call, one per distinct total (a run may report tiles of several
    passes); `image` becomes a preview frame only when the server's preview setting asks for previews.
    Every update is also a cancel point under the server."""

    def __init__(self):
        self._bars: dict[int, comfy.utils.ProgressBar] = {}
        self._previews = previews_enabled()

    def update(self, done: int, total: int, image=None) -> None:
        bar = self._bars.get(total) or self._bars.setdefault(total, comfy.utils.ProgressBar(total))
        preview = preview_frame(image) if image is not None and self._previews else None
        bar.update_absolute(done, total, preview=preview)
