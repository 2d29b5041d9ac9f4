"""Tile planning, cos^2 feather blending and the tiled runner shared by every backend."""
from .memory import choose_tile, free_bytes
from .plan import AxisPlan, TilePlan, plan_tiles
from .resample import resize, target_size
from .retry import TileOOMError, is_out_of_memory, shrink_on_oom, shrink_plan_on_oom
from .runner import RunHooks, TiledResult, run_tiled

__all__ = [
    "AxisPlan", "TilePlan", "plan_tiles", "choose_tile", "free_bytes", "resize", "target_size",
    "RunHooks", "TiledResult", "TileOOMError", "is_out_of_memory", "shrink_on_oom", "shrink_plan_on_oom", "run_tiled",
]
