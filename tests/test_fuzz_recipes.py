"""Property: whatever a recipe file says, ``unroll build`` either builds a model (exit 0, both
files written) or exits 2 with a short message (at most 15 lines, no traceback), within a time
and memory budget, and leaves nothing partial behind.

Recipes are made by mutating the bundled ones (shrunk, so that each example costs about a
second): dropped and added keys, wrong types, extreme and non-finite numbers, odd strings, deep
nesting, and text-level damage (alias bombs, duplicate keys, bad tags, non-UTF-8 bytes, cuts).
Each runs through the real CLI entry point inside one worker process with an address-space
limit (tests/fuzz_worker.py). The run is derandomised and has a fixed number of examples; a
longer soak: ``UNROLL_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_recipes.py``.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
EXAMPLES = int(os.environ.get("UNROLL_FUZZ_EXAMPLES", "60"))
#: the worker's address space: torch alone maps about 0.9 GiB as its CPU build and 3.4 GiB as the
#: CUDA build CI installs (its CUDA libraries are mapped, unused, even without a GPU)
ADDRESS_SPACE = 5 << 30
#: what build may estimate before it refuses (so that huge sizes are refused, not allocated)
MAX_MEMORY_GIB = 0.25
SECONDS = 30.0  # per example, generous for a loaded 2-core machine; a typical one takes 1 s
MAX_LINES = 15

pytestmark = pytest.mark.slow


def shrink(recipe: dict) -> dict:
    """The bundled recipe at a size that builds in about a second."""
    recipe = copy.deepcopy(recipe)
    recipe["architecture"].update(width=32, heads=2, depth=2, image_size=16, patch_size=8, classes=10)
    recipe["architecture"].pop("head_dim", None)
    if recipe.get("decoder"):
        recipe["decoder"]["depth"] = 1
    return recipe


BASES = {path.stem: shrink(yaml.safe_load(path.read_text())) for path in RECIPES}

SCALARS = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 3, 7, 64, 1000, 10**6, 10**9, 10**400, -(10**400), 0.0, -0.0, 1e-320, 1e308,
    float("nan"), float("inf"), float("-inf"), 0.5, 1e-9,
    "", " ", "a.b", "forward", "training", "../../x", "/tmp/abs", "x" * 10_000, "ünïcödé", "\x00", "1/sqrt(p)",
    "digits", "invert", "cls", "mean", "conv", "sincos", "compression", "lasso", "neumann", "Rc",
])
VALUES = st.one_of(
    SCALARS, st.integers(), st.floats(), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 3), st.sampled_from(["Rc", "fit", "neumann"])), max_size=3),
    st.dictionaries(st.sampled_from(["term", "eps", "lam", "order", "a"]), st.one_of(st.integers(-2, 2), SCALARS), max_size=2),
)
NEW_KEYS = st.sampled_from(["widht", "epsilon", "extra", "", "a.b", "forward", "__class__", "term", "weight", "1"])
#: command-line damage, including usage mistakes typer answers itself
EXTRA_ARGS = st.sampled_from([
    [], [], [], ["--set", "architecture.depth=[1"], ["--set", "layer.99.name=x"], ["--set", "=3"],
    ["--set", "a..b=1"], ["--set", "architecture.width.x=1"], ["--bogus"], ["--set", "layer.-1.step_size=.nan"],
    ["--set", "architecture.depth=100000"], ["--set", "architecture.width=16384"], ["--set", "name=../../x"],
    ["--set", "layer.0.relax.0.neumann=1000"], ["--set", "layer.1.iterations=1000"], ["--max-memory", "-1"],
    ["--set", "architecture.heads=32"], ["--set", "architecture.head_dim=1"], ["--set", "objective.Rc.weight=1e-3"],
    ["--set", "architecture.depth=128", "--set", "layer.1.iterations=3"],  # at the limits together
    ["--set", "architecture.depth=128", "--set", "layer.1.iterations=64"],
])


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in the tree: dict keys and list indices."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, (*prefix, i))
    return found


def at(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


@st.composite
def mutated(draw) -> tuple[bytes, list[str]]:
    """(recipe file bytes, extra command-line arguments)."""
    tree = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths(tree)))
        kind = draw(st.sampled_from(["drop", "add", "replace", "replace", "wrap"]))
        parent = at(tree, path[:-1]) if path else None
        if kind == "drop" and path:
            del parent[path[-1]]
        elif kind == "add" and isinstance(at(tree, path), dict):
            at(tree, path)[draw(NEW_KEYS)] = draw(VALUES)
        elif kind == "replace" and path:
            parent[path[-1]] = draw(VALUES)
        elif kind == "wrap" and path:
            value = parent[path[-1]]
            for _ in range(draw(st.integers(1, 60))):
                value = [value] if draw(st.booleans()) else {"k": value}
            parent[path[-1]] = value
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    damage = draw(st.sampled_from(["none"] * 6 + ["bomb", "duplicate", "deep", "bytes", "cut", "tag", "alias"]))
    if damage == "bomb":
        levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, draw(st.integers(2, 9)))]
        text += "\n".join(levels) + "\n"
    elif damage == "duplicate":
        text += text.splitlines()[draw(st.integers(0, len(text.splitlines()) - 1))].split(":")[0].strip(" -") + ": 1\n"
    elif damage == "deep":
        n = draw(st.integers(20, 5000))
        text += "deep: " + "[" * n + "]" * n + "\n"
    elif damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "tag":
        text += draw(st.sampled_from(["x: !!python/object/apply:os.system ['true']\n", "x: !!int 'abc'\n",
                                      "x: !!float [1]\n", "x: !!binary 'not base64'\n", "x: !!timestamp nope\n"]))
    elif damage == "alias":  # a legitimate-looking alias whose target is an anchored part of the recipe
        text = text.replace("architecture:", "architecture: &arch", 1) + "again: *arch\n"
    data = text.encode("utf-8")
    if damage == "bytes":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xfe\xff"])) + data[cut:]
    return data, draw(EXTRA_ARGS)


class Worker:
    """tests/fuzz_worker.py in a subprocess; restarted after a crash or a time-out."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_worker.py")), str(ADDRESS_SPACE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=ROOT)

    def run(self, args: list[str], timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 60)  # +60: the first call imports torch
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            return {"code": "no answer", "stderr": "the worker crashed or took too long", "seconds": None, "stdout": ""}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory):
    # hypothesis keeps caches in ./.hypothesis even without an example database: not in the checkout
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


def test_build_accepts_or_refuses_any_recipe_cleanly(worker, tmp_path_factory):
    outcomes: Counter = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(example=mutated())
    def check(example):
        data, extra = example
        folder = tmp_path_factory.mktemp("fuzz")
        recipe, out = folder / "recipe.yaml", folder / "out"
        recipe.write_bytes(data)
        args = ["build", str(recipe), "--out", str(out), "--max-memory", str(MAX_MEMORY_GIB), *extra]
        result = worker.run(args, SECONDS)
        stderr = result["stderr"]
        shown = f"\nargs: {extra}\nrecipe:\n{data[:1500]!r}\nstderr:\n{stderr[-3000:]}"
        assert result["code"] in (0, 2), f"exit {result['code']}" + shown
        assert "Traceback" not in stderr, "a traceback reached the user" + shown
        assert result["seconds"] <= SECONDS, f"took {result['seconds']:.1f} s" + shown
        written = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        if result["code"] == 0:
            assert written == ["model.safetensors", "recipe.yaml"], shown
        else:
            lines = stderr.strip().splitlines()
            assert 1 <= len(lines) <= MAX_LINES, f"{len(lines)} lines" + shown
            assert lines[0].startswith(("error: ", "Usage: ")), shown
            assert written == [], f"a failed build left {written}" + shown
        outcomes[result["code"]] += 1

    check()
    # a fuzz that only ever hit the YAML parser, or never hit it, would prove little
    assert min(outcomes[0], outcomes[2]) >= max(1, EXAMPLES // 20), dict(outcomes)
    print(f"fuzz: {dict(outcomes)} (exit code: examples)")
