"""`zoom IMAGE --steps 4 --mode recursive_multiscale`: every Chain-of-Zoom scale-state with its prompt.

Writes OUT/<stem>_zoom/: x0.png (the prepared input) .. x<steps>.png, prompts.txt (one line per
step), strip.png (the states side by side) and receipt.json (written last). The states are what the
Chain-of-Zoom Loop node returns for the same settings: both call zoom.zoom_loop.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from ..api import ModelPlaces, chain_of_zoom, load_prompt_model, load_upscaler
from ..zoom import SR_MODES
from .images import read_image, write_atomic


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cmd_zoom(args) -> int:
    places = ModelPlaces(args.models_root, args.comfyui_root, args.mirror)
    image = read_image(Path(args.image).expanduser())
    upscaler = None
    if args.mode in SR_MODES:  # nearest / bicubic are model-free baselines
        upscaler = load_upscaler(args.model, dtype=args.dtype, device=args.device, places=places)
    provider = None
    if args.prompt_model:
        provider = load_prompt_model(args.prompt_model, device=args.device, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, places=places)

    def on_state(n: int, _state) -> None:
        print(f"[{n}/{args.steps}] x{n} ({4 ** n}x)", file=sys.stderr, flush=True)

    result = chain_of_zoom(upscaler, image, args.steps, mode=args.mode, process_size=args.process_size,
                           prompt=args.prompt, prompt_model=provider, color_fix=args.color_fix, seed=args.seed,
                           tile=args.tile, device=args.device, on_state=on_state)
    folder = Path(args.out).expanduser().resolve() / f"{Path(args.image).stem}_zoom"
    for n, state in enumerate(result.states):
        write_atomic(folder / f"x{n}.png", _png(state))
    lines = [f"x{n}: {text}" for n, text in enumerate(result.prompts, start=1)]
    write_atomic(folder / "prompts.txt", ("\n".join(lines) + "\n").encode())
    write_atomic(folder / "strip.png", _png(result.strip()))
    write_atomic(folder / "receipt.json", result.receipt.to_json().encode())
    print(f"{len(result.states)} scale-states (x0..x{args.steps}), prompts.txt, strip.png and receipt.json in {folder}")
    for line in lines:
        print(line)
    return 0
