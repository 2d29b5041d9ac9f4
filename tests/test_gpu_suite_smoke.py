"""benchmarks/gpu_suite.py --smoke: the GPU suite's own code, on the CPU at tiny sizes, so it never rots."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_prints_one_complete_table(tmp_path):
    out_json = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| section")]
    measured = [r for r in rows if re.search(r"\| \d+\.\d{3} \|", r)]
    # GAN: Compact and RRDB x (ours fp32, ours bf16, core, untiled) measured; fp16 says why it did not run
    for model in ("Compact", "RRDB"):
        for variant in ("ours fp32", "ours bf16", "core (fp32)", "untiled (fp32)"):
            assert any(f"| GAN | {model}" in r and f"| {variant} |" in r for r in measured), (model, variant, rows)
        assert any(f"| GAN | {model}" in r and "| ours fp16 |" in r and "not run" in r for r in rows)
    assert any(r.startswith("| SD x4 |") for r in measured) and any(r.startswith("| CoZ SD3 |") for r in measured)
    assert not any("failed" in r for r in rows), rows
    assert out_json.is_file() and "SD x4" in out_json.read_text()
