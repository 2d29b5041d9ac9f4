"""Every receipt a test makes is validated against docs/receipt.schema.json (tests/receipt_schema.py), once
the test is done and the receipt complete."""
import pytest

from receipt_watch import receipts_made


@pytest.fixture(autouse=True)
def _receipts_match_schema():
    from receipt_schema import problems

    with receipts_made() as made:
        yield
    bad = [(type(r).__name__, p) for r in made for p in problems(r.to_dict())[:3]]
    assert not bad, f"receipts that break docs/receipt.schema.json: {bad[:6]}"
