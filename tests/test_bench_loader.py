"""python -m unroll.bench_loader: a smoke run with tiny settings writes sound figures (no timing asserted)."""

import json
import math
import tempfile

from unroll.bench_loader import main

TINY = ["architecture.width=32", "architecture.depth=1", "architecture.heads=2", "architecture.image_size=32",
        "architecture.patch_size=8"]


def test_tiny_run_writes_consistent_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the synthetic folder goes
    out = tmp_path / "bench.json"
    argv = ["--images", "8", "--size", "64x48", "--batch", "4", "--steps", "2", "--workers", "2", "--json", str(out)]
    for override in TINY:
        argv += ["--set", override]
    main(argv)
    r = json.loads(out.read_text())
    for key in ("loader_img_s", "loader_0_workers_img_s", "step_img_s", "fed_img_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert 0 <= r["fed_wait_fraction"] <= 1
    assert math.isclose(r["ratio"], r["loader_img_s"] / r["step_img_s"], rel_tol=1e-9)
    assert r["keeps_up"] == (r["ratio"] >= 1)
    assert r["workers_needed"] >= r["workers"]
    assert (r["input_size"], r["batch"], r["workers"]) == (32, 4, 2)
    assert not list(tmp_path.glob("unroll-bench-loader-*"))  # the temporary folder is gone
