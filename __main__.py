"""`python -m <pack folder> upscale|zoom|assets ...` (see cli/); `dreamforge-upscale` after pip install."""
from .cli import main

raise SystemExit(main(prog=f"python -m {__package__}"))
