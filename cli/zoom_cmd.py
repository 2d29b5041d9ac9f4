"""`zoom IMAGE --steps 4 --mode recursive_multiscale`: every Chain-of-Zoom scale-state with its prompt.

Writes OUT/<stem>_zoom/: x0.png (the prepared input) .. x<steps>.png, prompts.txt (one line per
step), strip.png (the states side by side) and receipt.json (written last). The states are what the
Chain-of-Zoom Loop node returns for the same settings: both call zoom.zoom_loop. `--coz-model` loads
Chain-of-Zoom's own model (SD3 medium + the authors' two LoRA files, as Load Chain-of-Zoom Model), `--tagger`
the DAPE tag prompts (as Load Tagger); the receipt is the Loop node's for the same files and settings.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from ..api import ModelPlaces, chain_of_zoom, load_prompt_model, load_tagger, load_upscaler
from ..imaging.image_io import read_image
from ..runtime.errors import UpscalerError
from ..zoom import SR_MODES
from .images import write_atomic
from .progress import shown


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _coz_options(args) -> dict:
    """The Chain-of-Zoom model's files, as the Load Chain-of-Zoom Model node takes them."""
    no_t5 = (args.t5xxl or "").lower() == "none"
    text = {"clip_l": args.clip_l, "clip_g": args.clip_g, "t5": None if no_t5 else args.t5xxl}
    return dict(transformer_lora=args.transformer_lora, vae_lora=args.vae_lora,
                text_encoders={k: v for k, v in text.items() if v}, use_t5=not no_t5,
                tokenizer_dir=args.clip_tokenizer, t5_tokenizer_dir=args.t5_tokenizer)


def _check(args) -> None:
    if args.coz_model and args.model:
        raise UpscalerError("give --model (a GAN or SD x4) or --coz-model (Chain-of-Zoom's SD3 model), not both")
    if args.tagger and args.prompt_model:
        raise UpscalerError("give --prompt-model (a vision-language model) or --tagger (DAPE tags), not both")
    coz_only = [f"--{k.replace('_', '-')}" for k in ("transformer_lora", "vae_lora", "clip_l", "clip_g", "t5xxl",
                                                     "t5_tokenizer") if getattr(args, k)]
    if coz_only and not args.coz_model:
        raise UpscalerError(f"{', '.join(coz_only)}: Chain-of-Zoom model files; add --coz-model BASE (SD3 medium)")


def cmd_zoom(args) -> int:
    _check(args)
    places = ModelPlaces(args.models_root, args.comfyui_root, args.mirror)
    image = read_image(Path(args.image).expanduser())
    upscaler = None
    if args.mode in SR_MODES:  # nearest / bicubic are model-free baselines
        if args.coz_model:
            upscaler = load_upscaler(args.coz_model, impl="diffusion", dtype=args.dtype, device=args.device,
                                     places=places, **_coz_options(args))
        else:
            upscaler = load_upscaler(args.model, dtype=args.dtype, device=args.device, places=places)
    provider = None
    if args.prompt_model:
        provider = load_prompt_model(args.prompt_model, device=args.device, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, places=places)
    elif args.tagger:
        provider = load_tagger(args.tagger, None if args.dape.lower() == "none" else args.dape,
                               max_tags=args.max_tags, drop_tags=args.drop_tags, keep_tags=args.keep_tags,
                               threshold_offset=args.threshold_offset, device=args.device,
                               places=places)

    def on_state(n: int, _state) -> None:
        print(f"[{n}/{args.steps}] x{n} ({4 ** n}x)", file=sys.stderr, flush=True)

    result = chain_of_zoom(upscaler, image, args.steps, mode=args.mode, process_size=args.process_size,
                           prompt=args.prompt, prompt_model=provider, color_fix=args.color_fix, seed=args.seed,
                           sampling=args.sampling, tile=args.tile, device=args.device, on_state=on_state)
    folder = Path(args.out).expanduser().resolve() / f"{Path(args.image).stem}_zoom"
    for n, state in enumerate(result.states):
        write_atomic(folder / f"x{n}.png", _png(state))
    lines = [f"x{n}: {text}" for n, text in enumerate(result.prompts, start=1)]
    write_atomic(folder / "prompts.txt", ("\n".join(lines) + "\n").encode())
    write_atomic(folder / "strip.png", _png(result.strip()))
    write_atomic(folder / "receipt.json", result.receipt.to_json().encode())
    print(f"{len(result.states)} scale-states (x0..x{args.steps}), prompts.txt, strip.png and receipt.json in "
          f"{shown(folder)}")
    for line in lines:
        print(line)
    return 0
