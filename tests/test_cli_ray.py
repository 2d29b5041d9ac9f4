"""`upscale --ray` on a real local Ray cluster (loopback, 2 CPUs) with 2 actors: outputs bit-identical to
the local run, every receipt written by the workers, a bad image reported, --skip-existing honoured."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dreamforge-upscale[cluster]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

from cli_photos import receipt_of, sha256, write_corrupt, write_photos  # noqa: E402
from dreamforge_upscale.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local cluster on 127.0.0.1; stopped when the module ends."""
    import dreamforge_upscale

    root = os.path.dirname(list(dreamforge_upscale.__path__)[0])  # where the workers import the pack from
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": root}}, logging_level="warning")
    yield ray.cluster_resources()
    ray.shutdown()
    assert not ray.is_initialized()


def test_ray_matches_local_run(tmp_path, capsys, cluster):
    assert cluster["CPU"] == 2
    photos = write_photos(tmp_path / "in", count=5)
    bad = write_corrupt(tmp_path / "in")[0]
    (tmp_path / "in" / "truncated.png").unlink()
    args = ["upscale", str(tmp_path / "in"), "--scale", "2.5", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 1
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 1
    out = capsys.readouterr().out
    assert "done 5, skipped 0, failed 1 (of 6)" in out
    assert f"failed: {bad}: not an image format Pillow can read" in out
    for src in photos:
        rel = src.relative_to(tmp_path / "in").parent / f"{src.stem}_x2.5.png"
        local, remote = tmp_path / "local" / rel, tmp_path / "ray" / rel
        assert local.read_bytes() == remote.read_bytes(), rel  # bit-identical
        receipt = receipt_of(remote)
        assert receipt["cli"]["output_sha256"] == sha256(remote)
        assert receipt["cli"]["settings"] == receipt_of(local)["cli"]["settings"]
        assert receipt["output_size"] == receipt_of(local)["output_size"]
    assert not list((tmp_path / "ray").rglob("*.part"))

    # resume on the cluster: only the output whose receipt is gone is redone
    redo = tmp_path / "ray" / f"{photos[0].stem}_x2.5.json"
    redo.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*")
            if p.is_file() and p != redo.with_suffix(".png")}
    assert main(args + ["--out", str(tmp_path / "ray"), "--ray", "--actors", "2", "--skip-existing"]) == 1
    assert "done 1, skipped 4, failed 1 (of 6)" in capsys.readouterr().out
    assert kept == {p: p.stat().st_mtime_ns for p in kept}
    assert redo.is_file() and receipt_of(redo)["cli"]["output_sha256"] == sha256(redo.with_suffix(".png"))
    with Image.open(redo.with_suffix(".png")) as im:
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "local" / redo.with_suffix(".png").name)))
