"""benchmarks/gpu_suite.py --smoke: the GPU suite's own code, on the CPU at tiny sizes, so it never rots;
and the benchmarks' small helpers (bench_gan's --crop parsing, receipt fields of either receipt shape)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_prints_one_complete_table(tmp_path):
    out_json = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)  # 30 s idle; minutes on a loaded CPU
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


def _benchmarks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gan
    import receipt_fields

    return bench_gan, receipt_fields


def test_crop_option_parses_and_refuses_what_it_cannot_use():
    import pytest

    bench_gan, _ = _benchmarks()
    crops = bench_gan.parse_crops("immuno=192, motorcycle=256")
    assert crops == {"immuno": 192, "motorcycle": 256}
    assert bench_gan.crop_for("motorcycle 741×500 / RRDB 6B (random)", crops, 0) == 256
    assert bench_gan.crop_for("coffee 600×400 / Compact", crops, 0) == 0
    for bad in ("immuno", "immuno=big", "immuno=8"):
        with pytest.raises(SystemExit, match="LABEL=SIDE"):
            bench_gan.parse_crops(bad)


def test_receipt_fields_read_typed_and_dict_receipts():
    _, fields = _benchmarks()
    plan = {"count": 4, "tile": [200, 200]}

    class Typed:
        def to_dict(self):
            return {"dtype": "fp32", "passes": [{"tiles": plan, "backend": {}}]}

    assert fields.tile_plan(Typed()) == plan and fields.dtype(Typed()) == "fp32"
    assert fields.tile_plan({"tile_plan": plan, "dtype": "bf16"}) == plan
    sdx4 = {"tile_plan": {"unet_tiles": {"count": 2}}, "dtype": "fp16"}
    assert fields.first_pass(sdx4)["backend"]["unet_tiles"]["count"] == 2
