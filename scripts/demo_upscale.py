"""End-to-end demo: a real headless ComfyUI with this pack upscales a picture x4.

    .venv/bin/python scripts/demo_upscale.py [--image PATH] [--model PATH] [--out DIR] [--scale S]

Starts ComfyUI (scripts/comfy_headless.py) with the pack in custom_nodes/, puts the picture into
input/ (default: ComfyUI's own example.png, a drawing, 768x768), queues the API workflow
example_workflows/api/upscale_bundled_x4.json (Load Image -> Load Upscaler -> ESRGAN Upscale ->
Color Fix (wavelet, reference = input) -> Save Image + Receipt, with the receipt also shown by
ComfyUI's own 'Preview as Text' node), waits for it, and copies the image (the receipt in its PNG)
and the receipt (JSON) into --out (default: out/ in the repository).

The model is the bundled realesr-animevideov3, made for drawings, anime and line art; for a photo
pass --model with a photo model (RealESRGAN_x4plus.pth: `python scripts/dreamforge_assets.py
prefetch --bundle upscalers --only RealESRGAN_x4plus` puts it in the models root).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_headless import REPO_ROOT, ComfyError, ComfyServer, comfyui_dir  # noqa: E402

WORKFLOW = REPO_ROOT / "example_workflows" / "api" / "upscale_bundled_x4.json"


def node_of(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise SystemExit(f"{WORKFLOW.name}: expected one {class_type} node, found {len(ids)}")
    return ids[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, help="picture to upscale (default: ComfyUI's example.png, a drawing)")
    ap.add_argument("--model", type=Path, help="upscale model file (.pth / .safetensors) to use instead of the "
                                               "bundled one, e.g. RealESRGAN_x4plus.pth for a photo")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "out", help="output folder (default: out/)")
    ap.add_argument("--scale", type=float, default=0.0, help="output/input size ratio; 0 = native x4 (default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the upscale")
    args = ap.parse_args(argv)

    prompt = json.loads(WORKFLOW.read_text())
    load, up, save, receipt_node = (node_of(prompt, c) for c in
                                    ("LoadImage", "DreamForgeESRGANUpscale", "DreamForgeSaveImage", "PreviewAny"))
    loader = node_of(prompt, "DreamForgeLoadUpscaler")
    if args.model and not args.model.is_file():
        raise SystemExit(f"--model {args.model}: no such file; pass an upscale model file (.pth / .safetensors)")
    args.out.mkdir(parents=True, exist_ok=True)

    server = ComfyServer(models=[args.model] if args.model else [])
    try:
        if args.image:
            if not args.image.is_file():
                raise SystemExit(f"--image {args.image}: no such file")
            name = server.add_input_image(args.image, args.image.name)
            if not args.model:
                print("note: the bundled model is made for drawings, anime and line art and flattens photos; "
                      "for a photo pass --model RealESRGAN_x4plus.pth (see --help)", flush=True)
        else:
            name = server.add_input_image(comfyui_dir() / "input" / "example.png", "example.png")
        if args.model:
            prompt[loader]["inputs"]["model_name"] = args.model.name
        prompt[load]["inputs"]["image"] = name
        prompt[up]["inputs"]["scale"] = args.scale

        print(f"starting ComfyUI ({server.comfy_dir}) with the pack as custom_nodes/{server.pack_name} ...", flush=True)
        server.start()
        print(f"ComfyUI is up at {server.url} after {server.startup_seconds:.1f} s; upscaling {name} ...", flush=True)
        started = time.monotonic()
        entry = server.run(prompt, timeout=args.timeout)
        seconds = time.monotonic() - started

        (image,) = server.output_images({"outputs": {save: entry["outputs"][save]}})
        receipt = json.loads(entry["outputs"][receipt_node]["text"][0])
        suffix = f"x{args.scale:g}" if args.scale else f"x{receipt['native_scale']}"
        stem = f"{Path(name).stem}_{suffix}"
        out_image = args.out / f"{stem}.png"
        out_receipt = args.out / f"{stem}.receipt.json"
        shutil.copyfile(image, out_image)
        out_receipt.write_text(json.dumps({"workflow": str(WORKFLOW.relative_to(REPO_ROOT)), "input": name,
                                           "prompt_seconds": round(seconds, 2), "receipt": receipt}, indent=1))
        w, h = receipt["input_size"]
        ow, oh = receipt["output_size"]
        tiles = sum(p["tiles"]["count"] for p in receipt["passes"])
        print(f"done in {seconds:.1f} s: {w}x{h} -> {ow}x{oh} with {receipt['model']['file']} "
              f"({receipt['model']['architecture']}, {receipt['dtype']} on {receipt['device']}, "
              f"{receipt['pass_count']} pass(es), {tiles} tile(s))")
        print(f"image:   {out_image.resolve()}")
        print(f"receipt: {out_receipt.resolve()}")
        return 0
    except (ComfyError, RuntimeError, TimeoutError) as exc:
        log = args.out / "comfyui.log"
        if server.log_path.exists():
            shutil.copyfile(server.log_path, log)
        print(f"FAILED: {exc}\nComfyUI log: {log.resolve()}", file=sys.stderr)
        return 1
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
