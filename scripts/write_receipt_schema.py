"""Write docs/receipt.schema.json from the receipt dataclasses (upscalers/receipts.py): run after changing them.

    .venv/bin/python scripts/write_receipt_schema.py
tests/test_receipts.py fails while the file and the classes disagree.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_smoke  # noqa: E402  (DREAMFORGE_BENCH_OUT: where the file goes instead)
import pack_import  # noqa: E402

pack_import.install()
from dreamforge_upscale.upscalers.receipts import json_schema  # noqa: E402

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "receipt.schema.json"

if __name__ == "__main__":
    path = bench_smoke.out_path(SCHEMA_FILE)
    path.write_text(json.dumps(json_schema(), indent=1) + "\n")
    print(f"wrote {path}")
