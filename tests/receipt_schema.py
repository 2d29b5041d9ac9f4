"""Every receipt the suite produces is checked against docs/receipt.schema.json.

In-process receipts: tests/receipt_fixtures.py watches every receipt object made during a test and validates its
final state when the test ends. Receipts made inside the ComfyUI server arrive as JSON text (the
DreamForgeTestSaveText node writes them to the server's output folder): the session fixture validates
every such file when the server stops.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "receipt.schema.json"


@lru_cache(maxsize=None)
def validator(kind: str | None = None) -> jsonschema.protocols.Validator:
    """The whole schema, or (for readable messages) the definition of one receipt kind."""
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    if kind is not None:
        name = next((ref["$ref"].split("/")[-1] for ref in schema["oneOf"]
                     if schema["$defs"][ref["$ref"].split("/")[-1]]["properties"]["kind"]["const"] == kind), None)
        if name is not None:
            schema = {**schema, "oneOf": [{"$ref": f"#/$defs/{name}"}]}
    return cls(schema)


def problems(receipt: dict) -> list[str]:
    """Every way `receipt` (a receipt's JSON object) breaks the schema, readably."""
    kind = receipt.get("kind") if isinstance(receipt, dict) else None
    found = list(validator(kind if isinstance(kind, str) else None).iter_errors(receipt))
    errors = [c for e in found for c in (e.context or [e])]  # inside oneOf: the branch's own errors
    return [f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message[:300]}" for e in errors]


def is_receipt_json(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "receipt_version" in value else None
