"""1024x1024 -> 4096x4096 through the SD x4 path on the CPU, in a child process under a hard data limit."""
import json
import subprocess
import sys
from pathlib import Path

from receipt_schema import problems

CHILD = r'''
import json, re, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import pack_import; pack_import.install()
import tiny_sdx4
from PIL import Image
from skimage import data
from dreamforge_upscale.tiling import RunHooks
from dreamforge_upscale.upscalers import UpscaleRequest, upscale
from dreamforge_upscale.upscalers.contract import ModelSource
from dreamforge_upscale.upscalers.sdx4 import SDX4Options, SDX4Upscaler
from dreamforge_upscale.upscalers.sdx4.components import SDX4Components, clip_tokenizer
from dreamforge_upscale.upscalers.sdx4.sampler import vae_bytes_per_pixel

budget = int(sys.argv[3])
unet, vae, text = tiny_sdx4.build_components(0, unet_channels=8, vae_channels=8, groups=8, vae_attention=False)
model = SDX4Upscaler(SDX4Components(unet, vae, text, clip_tokenizer(tiny_sdx4.clip_tokenizer_dir())),
                     ModelSource("tiny", None, "test"))
photo = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.BICUBIC)
image = torch.from_numpy(__import__("numpy").asarray(photo).copy()).float().div(255)[None]
opts = SDX4Options(steps=1, guidance=7.5)
upscale(model, image[:, :32, :32], UpscaleRequest(options=opts, seed=0))  # warm up threads and the allocator
data_now = int(re.search(r"VmData:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
limits = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (data_now + budget, limits[1]))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
# The host reports exactly the budget as free: auto sizing must plan within it.
out, receipt = upscale(model, image, UpscaleRequest(options=opts, seed=0), hooks=RunHooks(free_bytes=lambda device: budget))
seconds = time.perf_counter() - start
resource.setrlimit(resource.RLIMIT_DATA, limits)
print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(out).all()), "std": float(out.std()),
                  "receipt": receipt.to_dict(), "seconds": seconds,
                  "untiled_decode_bytes": vae_bytes_per_pixel(model.comps, torch.float32) * 1024 * 1024}))
'''


def test_1024_to_4096_completes_within_a_hard_memory_limit():
    tests_dir = Path(__file__).resolve().parent
    scripts_dir = tests_dir.parent / "scripts"
    budget = 1536 * 2**20  # the 4096^2 float32 canvas is 201 MB of it
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tests_dir), str(scripts_dir), str(budget)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 4096, 4096, 3] and result["finite"] and result["std"] > 0.02
    assert not problems(result["receipt"])  # made in the child: the suite-wide check cannot see it
    (only,) = result["receipt"]["passes"]
    plan = only["backend"]
    assert plan["unet_tiles"]["count"] > 1  # latent tiles chosen from the budget
    assert plan["vae_tiles"]["count"] > 1 and max(plan["vae_tiles"]["window"]) <= 256  # the sampler caps windows
    # exact statistics in one pass, the windows parked in files between GroupNorms; no out-of-memory retry
    assert plan["vae_tiles"]["statistics"].pop("parked_bytes") > budget  # more than the budget could ever hold
    assert plan["vae_tiles"]["statistics"] == {"side": 1024, "exact": True, "one_pass": True, "attention": "none",
                                               "parked": "disk"}
    assert result["receipt"]["retries"] == []
    assert result["untiled_decode_bytes"] > 4 * budget  # an untiled decode could never have fitted
