"""Command line for model assets: prefetch, verify, list.

    python -m <pack folder> assets prefetch --bundle upscalers [--models-root DIR]
    python scripts/dreamforge_assets.py prefetch --manifest FILE.json [--models-root DIR]
    python scripts/dreamforge_assets.py verify [--manifest FILE.json] [--models-root DIR]
    python scripts/dreamforge_assets.py list [--json] [--models-root DIR]

`prefetch` is the one command that downloads (remote fetch is off everywhere else). Status goes
to stdout, progress bars and errors to stderr; the exit status is 0 only when everything asked for
is installed and verified.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..assets.catalog import BUNDLES, CATALOG, FOLDERS, bundle_specs, load_manifest, parse_revisions
from ..assets.discovery import ENV_MIRROR, ENV_MODELS_ROOT, Locations, install, list_installed
from ..assets.verify import verify
from ..runtime.errors import AssetError, UpscalerError


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _locations(args) -> Locations:
    return Locations.standalone(args.models_root, getattr(args, "mirror", None), use_cache=not getattr(args, "no_cache", False))


def _specs(args, for_prefetch: bool):
    revisions = parse_revisions(getattr(args, "revision", None))
    if args.manifest:
        specs = load_manifest(args.manifest, revisions)
        if args.only:
            unknown = sorted(set(args.only) - {s.name for s in specs})
            if unknown:
                raise AssetError(f"--only {', '.join(unknown)}: not in {args.manifest}; its entries are: "
                                 f"{', '.join(s.name for s in specs)}")
            specs = [s for s in specs if s.name in args.only]
    elif args.bundle:
        if for_prefetch:
            specs = bundle_specs(args.bundle, args.only, revisions)
        else:
            specs = [CATALOG[n] for n in BUNDLES[args.bundle] if not args.only or n in args.only]
    else:
        return None
    endpoint = getattr(args, "endpoint", None)
    if endpoint:
        specs = [s if s.is_file or s.endpoint else replace(s, endpoint=endpoint) for s in specs]
    return specs


def cmd_prefetch(args) -> int:
    specs = _specs(args, for_prefetch=True)
    locations = _locations(args)
    failed = []
    for spec in specs:
        try:
            got = install(spec, locations, progress=not args.no_progress, timeout=args.timeout, retries=args.retries)
        except (UpscalerError, OSError) as exc:  # OSError: a folder that cannot be written, a full disk
            failed.append(spec.name)
            print(f"error: {spec.name}: {exc}", file=sys.stderr)
            continue
        print(f"{spec.name}: {got.origin}: {got.path}" + (f" ({got.note})" if got.note else ""), flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(specs)} asset(s) not installed: {', '.join(failed)} (see the messages above)",
              file=sys.stderr)
        return 1
    print(f"{len(specs)} asset(s) installed and verified under {locations.install_dir(specs[0].folder).parent}")
    return 0


def _load_gan(path: Path) -> None:
    """The offline load check of an upscale_models file: spandrel, as every GAN run loads it (imported here:
    `list` and `prefetch` need no torch)."""
    import torch

    from ..upscalers.gan import GANUpscaler

    GANUpscaler.load(path, dtype="fp32", device=torch.device("cpu"))


def cmd_verify(args) -> int:
    checks = verify(_locations(args), _specs(args, for_prefetch=False), load_gan=None if args.no_load else _load_gan)
    if args.json:
        print(json.dumps([c.as_json() for c in checks], indent=1))
    else:
        rows = [[c.status, c.folder, c.name, (c.actual or "-")[:12], c.detail] for c in checks]
        print(_table(rows, ["status", "folder", "name", "sha256", "detail"]) if rows else "nothing installed to verify")
    bad = [c for c in checks if not c.passed]
    for c in bad:
        print(f"error: {c.folder}/{c.name} ({c.path}): {c.status}: {c.detail}", file=sys.stderr)
    return 1 if bad else 0


def cmd_list(args) -> int:
    locations = _locations(args)
    items = list_installed(locations)
    if args.json:
        print(json.dumps({"models_root": str(locations.install_dir("upscale_models").parent),
                          "models": [i.as_json() for i in items]}, indent=1))
        return 0
    rows = [[i.name + ("/" if i.is_dir else ""), i.folder, _human(i.size), (i.sha256 or "-")[:12], i.source,
             str(i.path.parent)] for i in items]
    print(_table(rows, ["name", "folder", "size", "sha256", "source", "location"]) if rows else "no models installed")
    return 0


def build_parser(prog: str = "assets") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="DreamForge Upscale model assets: prefetch, verify, list.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--models-root", metavar="DIR",
                       help=f"models root with upscale_models/ checkpoints/ diffusers/ LLM/ (default: ${ENV_MODELS_ROOT} "
                            "or ~/.cache/dreamforge-upscale/models; a ComfyUI models/ folder works too)")

    def selection(p, required: bool):
        g = p.add_mutually_exclusive_group(required=required)
        g.add_argument("--bundle", choices=sorted(BUNDLES), help="the built-in catalogue's entries")
        g.add_argument("--manifest", metavar="FILE", help="JSON manifest of registry_model / diffusers_cache entries")
        p.add_argument("--only", nargs="+", metavar="NAME", help=f"just these entries (bundle upscalers: {', '.join(CATALOG)})")

    p = sub.add_parser("prefetch", help="install missing models (the only command that downloads)")
    selection(p, required=True)
    common(p)
    p.add_argument("--mirror", metavar="DIR", help=f"local mirror folder holding files by name (default: ${ENV_MIRROR})")
    p.add_argument("--revision", action="append", metavar="REPO=REV",
                   help="pin/override a repository snapshot's revision (repeatable)")
    p.add_argument("--endpoint", metavar="URL", help="Hugging Face endpoint for snapshots without one (default: $HF_ENDPOINT "
                                                     "or https://huggingface.co)")
    p.add_argument("--no-cache", action="store_true", help="do not copy from the torch hub / Hugging Face caches")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a connection counts as lost")
    p.add_argument("--retries", type=int, default=3, help="resumes of a dropped download within this run (default 3)")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser("verify", help="SHA-256 of every installed model and an offline load check")
    selection(p, required=False)
    common(p)
    p.add_argument("--no-load", action="store_true", help="hashes only, no load check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help=f"installed models ({', '.join(FOLDERS)}) with size, hash and source")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "assets":
        argv = argv[1:]
    args = build_parser(prog or "assets").parse_args(argv)
    try:
        return args.func(args)
    except (UpscalerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - run through __main__.py or scripts/dreamforge_assets.py
    raise SystemExit(main())
