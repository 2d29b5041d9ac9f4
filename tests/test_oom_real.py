"""A real CPU allocation failure (address-space limit in a child process) makes the tiler halve and retry."""
import json
import subprocess
import sys
from pathlib import Path

from receipt_schema import problems

CHILD = r'''
import json, re, resource, sys
import torch
sys.path.insert(0, sys.argv[1]); import pack_import; pack_import.install()
from dreamforge_upscale.tiling import RunHooks
from dreamforge_upscale.upscalers import GANUpscaler, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path
model = GANUpscaler.load(bundled_model_path())
torch.manual_seed(0)
image = torch.rand(1, 1024, 1024, 3)
upscale(model, torch.rand(1, 8, 8, 3))  # warm up threads and the allocator before the limit
data = int(re.search(r"VmData:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
limits = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (data + 400 * 2**20, limits[1]))
# The host claims plenty of free memory, so auto picks one untiled pass: ~580 MB of activations plus
# the 200 MB output, which the 400 MB limit refuses; so does 512 (200 MB canvas + ~280 MB window). The
# tiler must catch the failures and shrink. 256 needs ~280 MB: with 350 MB it failed one run in five,
# when what the failed attempts left in the heap took the rest.
out, receipt = upscale(model, image, hooks=RunHooks(free_bytes=lambda device: 10**12))
resource.setrlimit(resource.RLIMIT_DATA, limits)  # checking the output needs memory of its own
print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(out).all()), "receipt": receipt.to_dict()}))
'''


def test_cpu_allocation_failure_halves_tile_and_completes():
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", CHILD, tests_dir], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 4096, 4096, 3] and result["finite"]
    retries = result["receipt"]["retries"]
    assert retries and {k: retries[0][k] for k in ("event", "tile", "retry_tile")} == {
        "event": "out_of_memory", "tile": 1024, "retry_tile": 512}
    assert "allocate" in retries[0]["allocator"]  # the allocator's own words reach the receipt
    assert result["receipt"]["passes"][0]["tiles"]["count"] > 1
    assert not problems(result["receipt"])  # made in the child: the suite-wide check cannot see it
