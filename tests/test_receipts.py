"""Typed receipts (upscalers/receipts.py): one shape whatever the path, and the schema the suite checks them with.

tests/receipt_fixtures.py validates every receipt a test makes against docs/receipt.schema.json; these tests make
sure that check has teeth (a broken receipt is rejected) and that the file is the classes' schema.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from skimage import data

from dreamforge_upscale.upscalers import GANUpscaler, UpscaleRequest, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path
from dreamforge_upscale.upscalers.receipts import (
    RECEIPT_VERSION, BatchReceipt, UpscaleReceipt, ZoomStepReceipt, json_schema,
)
from dreamforge_upscale.zoom import ZoomSettings, prepare, zoom_step
from dreamforge_upscale.imaging.image_io import to_pil
from receipt_schema import SCHEMA_FILE, problems
from receipt_watch import receipts_made
from zoom_helpers import BicubicX4


@pytest.fixture(scope="module")
def compact():
    return GANUpscaler.load(bundled_model_path(), device=torch.device("cpu"))


def photo(h: int = 8, w: int = 12) -> torch.Tensor:
    return torch.from_numpy(data.astronaut()[40:40 + h, 200:200 + w].copy()).float().div(255)[None]


def test_the_schema_file_is_the_classes_schema():
    on_disk = json.loads(SCHEMA_FILE.read_text())
    assert on_disk == json_schema(), (
        "docs/receipt.schema.json is out of date with upscalers/receipts.py: "
        "run `.venv/bin/python scripts/write_receipt_schema.py` and commit the file")
    assert f"receipt_version {RECEIPT_VERSION}" in on_disk["description"]


@pytest.mark.parametrize("scale", [None, 16.0])
def test_a_gan_receipt_lists_its_passes_with_one_shape(compact, scale):
    """x4 model: one native pass for 4x, two for 16x; `passes` is a list either way, with the same keys."""
    _, one = upscale(compact, photo())
    _, receipt = upscale(compact, photo(), UpscaleRequest(scale=scale))
    one, r = one.to_dict(), receipt.to_dict()
    count = 1 if scale is None else 2
    assert r["receipt_version"] == RECEIPT_VERSION and r["kind"] == "upscale"
    assert r["pass_count"] == count and isinstance(r["passes"], list) and len(r["passes"]) == count
    assert set(r) == set(one) and all(set(p) == set(one["passes"][0]) for p in r["passes"])
    assert [p["index"] for p in r["passes"]] == list(range(1, count + 1))
    sizes = [(p["input_size"], p["output_size"]) for p in r["passes"]]
    assert sizes == [([12 * 4**k, 8 * 4**k], [12 * 4**(k + 1), 8 * 4**(k + 1)]) for k in range(count)]
    assert all(isinstance(p["tiles"], dict) and p["tiles"]["count"] >= 1 for p in r["passes"])  # the pack tiled
    assert r["output_size"] == [12 * 4**count, 8 * 4**count] and r["resampled"] is None
    assert json.loads(receipt.to_json()) == r  # the JSON users see is the dict


def test_a_per_tile_prompt_and_a_text_prompt_give_the_same_prompt_record_shape():
    image = photo(24, 32)
    per_tile, text = BicubicX4(prompted=True), BicubicX4(prompted=True)
    _, tiled = upscale(per_tile, image,
                       UpscaleRequest(tile=8, overlap=2, prompt=lambda box: f"tile at {box[0]},{box[1]}"))
    _, plain = upscale(text, image, UpscaleRequest(tile=8, overlap=2, prompt="a face"))
    tiled, plain = tiled.to_dict(), plain.to_dict()
    assert set(tiled["prompt"]) == set(plain["prompt"]) == {"mode", "text", "used", "note"}
    assert tiled["prompt"]["mode"] == "per_tile" and plain["prompt"]["mode"] == "text"
    assert tiled["prompt"]["used"] is plain["prompt"]["used"] is True
    assert plain["prompt"]["text"] == "a face" and tiled["prompt"]["text"] is None  # the texts are per tile
    # every tile's own text, once per tile, in tile order; the backend got exactly those
    (tiles,) = [p["prompts"] for p in tiled["passes"]]
    assert len(tiles) == tiled["passes"][0]["tiles"]["count"] > 1
    assert all(set(t) == {"window", "text", "tile"} and t["text"] == f"tile at {t['window'][0]},{t['window'][1]}"
               for t in tiles)
    assert [c["prompt"] for c in per_tile.calls] == [t["text"] for t in tiles]
    (whole,) = plain["passes"][0]["prompts"]
    assert whole == {"window": [0, 0, 32, 24], "text": "a face", "tile": None}
    assert {c["prompt"] for c in text.calls} == {"a face"}


def test_a_model_without_prompts_records_the_prompt_it_ignored(compact):
    _, given = upscale(compact, photo(), UpscaleRequest(prompt="a face"))
    _, none = upscale(compact, photo())
    given = given.to_dict()
    assert given["prompt"] == {"mode": "text", "text": "a face", "used": False,
                               "note": "the model takes no prompt: the text was not used"}
    assert given["passes"][0]["prompts"] == [] and none.to_dict()["prompt"] is None


def _valid_upscale(compact) -> dict:
    _, receipt = upscale(compact, photo())
    r = receipt.to_dict()
    assert problems(r) == []
    return r


@pytest.mark.parametrize("break_it,where", [
    (lambda r: r.update(passes={"1": r["passes"][0]}), "passes"),  # the old dict-or-list shape
    (lambda r: r.pop("pass_count"), "pass_count"),  # a missing field
    (lambda r: r.update(tile_plan={"count": 1}), "tile_plan"),  # a field the schema does not know
    (lambda r: r["passes"][0].pop("backend"), "backend"),  # deep inside
    (lambda r: r.update(prompt="a face"), "prompt"),  # a bare string where a record belongs
    (lambda r: r.update(receipt_version=RECEIPT_VERSION + 1), "receipt_version"),
])
def test_the_validator_rejects_a_broken_receipt(compact, break_it, where):
    broken = copy.deepcopy(_valid_upscale(compact))
    break_it(broken)
    found = problems(broken)
    assert found and any(where in p for p in found), found


def test_the_suite_wide_check_sees_every_receipt_made(compact):
    """receipt_fixtures.py's check sees every receipt object made (receipt_watch.py), once each."""
    with receipts_made() as seen:
        upscale(compact, photo(), UpscaleRequest(scale=16.0))
    assert [type(r) for r in seen] == [UpscaleReceipt]
    # a receipt made wrong (passes as a dict, as before the typed receipts) is what that check reports
    bad = seen[0].to_dict()
    bad["passes"] = {"1": bad["passes"][0]}
    assert any(p.startswith("passes") for p in problems(bad))


def test_a_batch_receipt_validates_and_holds_one_receipt_per_image():
    settings = ZoomSettings(mode="recursive", process_size=32, color_fix="none")
    items = [zoom_step(BicubicX4(), prepare(to_pil(photo(40, 48)[0] * gain), 32), 1, settings, index=i).receipt
             for i, gain in enumerate((1.0, 0.5))]
    batch = BatchReceipt(items=items).to_dict()
    assert problems(batch) == []
    assert batch["kind"] == "batch" and [i["kind"] for i in batch["items"]] == ["zoom_step"] * 2
    assert [i["image"] for i in batch["items"]] == [0, 1] and all(isinstance(i, ZoomStepReceipt) for i in items)
    broken = copy.deepcopy(batch)
    del broken["items"][1]["crop"]
    assert problems(broken)
