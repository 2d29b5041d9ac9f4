"""The command line: `upscale`, `zoom` and `assets` (model assets, cli/assets_cmd.py).

    python -m <pack> upscale INPUT... [--scale 2.5] [--impl auto|gan|diffusion] [--model NAME] [--out DIR]
                     [--tile N] [--prompt TEXT] [--seed N] [--skip-existing] [--ray [ADDRESS]]
    python -m <pack> zoom IMAGE [--steps 4] [--mode recursive_multiscale] [--prompt-model PATH | --tagger RAM]
                     [--coz-model BASE [--transformer-lora F] [--vae-lora F]] [--sampling sample|mean]
    python -m <pack> assets prefetch|verify|list ...
    dreamforge-upscale ...            (the console script of `pip install .`)

Exit status: 0 when every image was done or skipped, 1 when any failed (each is named in the final
summary) or a model could not be loaded, 2 for a bad command line, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys

from ..assets.bundled_model import BUNDLED_MODEL
from ..assets.discovery import ENV_MIRROR, ENV_MODELS_ROOT
from ..runtime.dtypes import DTYPE_NAMES
from ..runtime.errors import UpscalerError
from ..tiling.resample import METHODS as RESAMPLE_METHODS
from ..upscalers.coz_sd3.lora import LORA_FOLDER, TRANSFORMER_LORA, VAE_ENCODER_LORA
from ..upscalers.impl_policy import IMPLS
from ..upscalers.request import DEFAULT_OVERLAP
from ..zoom import COLOR_FIX_CHOICES, DEFAULT_PROCESS_SIZE, MODES, SAMPLING_CHOICES
from .progress import shown


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (found as `assets` finds them; nothing is downloaded)")
    g.add_argument("--model", metavar="NAME", help=f"a path, a file in upscale_models/, diffusers/<folder> or "
                                                   f"checkpoints/<file> (default: the bundled {BUNDLED_MODEL})")
    g.add_argument("--models-root", metavar="DIR", help=f"models root (default: ${ENV_MODELS_ROOT} or "
                                                        "~/.cache/dreamforge-upscale/models)")
    g.add_argument("--comfyui-root", metavar="DIR", help="use a ComfyUI install's models/ folders too (searched first)")
    g.add_argument("--mirror", metavar="DIR", help=f"local mirror folder holding files by name (default: ${ENV_MIRROR})")
    g.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="auto: fp16 on CUDA where the model allows it, fp32 on the CPU")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")


def _upscale_parser(sub) -> None:
    p = sub.add_parser("upscale", help="upscale image files, folders (recursive) and globs",
                       description="Upscale every image named by INPUT (files, folders searched recursively by "
                                   "extension, glob patterns). Each output is OUT/<sub-folder>/<name>_x<scale>.png "
                                   "with a JSON receipt <name>_x<scale>.json beside it (written last).")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--scale", type=float, default=4.0, help="output / input size, e.g. 2.5 (default 4)")
    p.add_argument("--impl", choices=IMPLS, default="auto",
                   help="auto: a GAN below 3x, the SD x4 model from 3x when --model is one; gan / diffusion: insist")
    p.add_argument("--out", default="upscaled", metavar="DIR", help="output folder (default ./upscaled)")
    p.add_argument("--tile", type=int, default=0, help="tile side in input px (0 = auto: the largest that fits)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="feathered overlap between tiles (px)")
    p.add_argument("--resample", choices=RESAMPLE_METHODS, default="lanczos",
                   help="filter for scales other than the model's native one")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume: skip outputs whose receipt is complete and matches these settings")
    _model_args(p)
    g = p.add_argument_group("Stable Diffusion x4 upscaler (GAN models record and ignore these)")
    g.add_argument("--prompt", help="what the picture shows (default: 'high quality, detailed')")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, help="noise seed (default: drawn per image and written in its receipt)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--noise-level", type=int, default=20)
    g.add_argument("--clip-tokenizer", metavar="DIR", help="CLIP tokenizer folder for the SD x4 single file "
                                                           "(default: ComfyUI's, with --comfyui-root)")
    g = p.add_argument_group("Ray cluster (pip install dreamforge-upscale[cluster])")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local cluster (or joins $RAY_ADDRESS); 'auto' or "
                        "HOST:PORT joins a running one. Outputs and receipts are written by the workers.")
    g.add_argument("--actors", type=int, default=0,
                   help="model-holding workers (default: one per GPU in the cluster, else 1)")
    p.set_defaults(func="upscale")


def _zoom_parser(sub) -> None:
    p = sub.add_parser("zoom", help="Chain-of-Zoom: every 4x scale-state of an image and its prompt",
                       description="Chain-of-Zoom extreme zoom (as the Chain-of-Zoom Loop node): writes x0..x<steps>.png, "
                                   "prompts.txt, a side-by-side strip.png and receipt.json to OUT/<name>_zoom/.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--steps", type=int, default=4, help="scale-states after x0 (x_n is 4**n times x0)")
    p.add_argument("--mode", choices=MODES, default="recursive_multiscale")
    p.add_argument("--process-size", type=int, default=DEFAULT_PROCESS_SIZE, help="side of every state (multiple of 8)")
    p.add_argument("--prompt", default="", help="your prompt; with a prompt model: '{generated}, {yours},'")
    p.add_argument("--prompt-model", metavar="PATH", help="a transformers vision-language model folder (or its name "
                                                          "in the models root's LLM/)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--color-fix", choices=COLOR_FIX_CHOICES, default="wavelet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=SAMPLING_CHOICES, default="sample",
                   help="Chain-of-Zoom's own model: sample = the paper's posterior sample (noise from --seed), "
                        "mean = the posterior mean, no noise (deterministic)")
    p.add_argument("--tile", type=int, default=0)
    p.add_argument("--out", default="zoomed", metavar="DIR", help="output folder (default ./zoomed)")
    _model_args(p)
    g = p.add_argument_group("Chain-of-Zoom's own model: SD3 medium + the authors' LoRA (Load Chain-of-Zoom Model)")
    g.add_argument("--coz-model", metavar="BASE",
                   help="SD3 medium: a diffusers folder or sd3_medium*.safetensors (a path, diffusers/<folder> or "
                        "checkpoints/<file>); instead of --model")
    g.add_argument("--transformer-lora", metavar="FILE", help=f"the authors' SR_LoRA/{TRANSFORMER_LORA} (a path or a "
                                                              f"name in loras/; default {LORA_FOLDER}/{TRANSFORMER_LORA})")
    g.add_argument("--vae-lora", metavar="FILE", help=f"the authors' SR_VAE/{VAE_ENCODER_LORA} (default "
                                                      f"{LORA_FOLDER}/{VAE_ENCODER_LORA})")
    g.add_argument("--clip-l", metavar="FILE", help="clip_l.safetensors when the checkpoint has no CLIP-L (a path or a "
                                                    "name in text_encoders/ or clip/; default: clip_l.safetensors there)")
    g.add_argument("--clip-g", metavar="FILE", help="clip_g.safetensors when the checkpoint has no CLIP-G")
    g.add_argument("--t5xxl", metavar="FILE", help="the T5 file when the checkpoint has none (default: "
                                                   "t5xxl_fp16.safetensors there); 'none': no T5")
    g.add_argument("--clip-tokenizer", metavar="DIR", help="CLIP tokenizer folder for a single file (default: "
                                                           "ComfyUI's, with --comfyui-root)")
    g.add_argument("--t5-tokenizer", metavar="DIR", help="T5 tokenizer folder for a single file (default: ComfyUI's)")
    g = p.add_argument_group("DAPE tag prompts (Load Tagger): Recognize Anything + the DAPE LoRA")
    g.add_argument("--tagger", metavar="RAM", help="ram_swin_large_14m.pth (a path or a name in RAM/); instead of "
                                                   "--prompt-model")
    g.add_argument("--dape", default="DAPE.pth", metavar="FILE", help="the DAPE LoRA merged into RAM (default "
                                                                      "DAPE.pth in RAM/); 'none': plain RAM")
    g.add_argument("--max-tags", type=int, default=0, help="0 = every tag that fires")
    g.add_argument("--drop-tags", default="", metavar="TAGS", help="tags never to use, comma-separated")
    g.add_argument("--keep-tags", default="", metavar="TAGS", help="tags always to use, comma-separated")
    g.add_argument("--threshold-offset", type=float, default=0.0, help="added to every tag's threshold")
    p.set_defaults(func="zoom")


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="DreamForge Upscale without ComfyUI.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{upscale,zoom,assets}")
    _upscale_parser(sub)
    _zoom_parser(sub)
    sub.add_parser("assets", help="model assets: prefetch, verify, list (see `assets --help`)", add_help=False)
    return ap


def main(argv: list[str] | None = None, prog: str = "dreamforge-upscale") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "assets":  # its own parser, unchanged
        from .assets_cmd import main as assets_main

        return assets_main(argv[1:], prog=f"{prog} assets")
    args = build_parser(prog).parse_args(argv)
    try:
        if args.func == "upscale":
            from .upscale_cmd import cmd_upscale

            return cmd_upscale(args)
        from .zoom_cmd import cmd_zoom

        return cmd_zoom(args)
    except (UpscalerError, OSError) as exc:
        print(f"error: {shown(exc)}", file=sys.stderr)  # it may quote a file name: one safe line
        return 1
