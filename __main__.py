"""`python -m <pack folder> assets prefetch|verify|list ...` (see upscalers/assets_cli.py)."""
from .upscalers.assets_cli import main

raise SystemExit(main())
