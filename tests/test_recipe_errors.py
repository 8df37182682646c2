"""Broken recipes fail with a short error that names the file and the field and says what was
expected; never a traceback, never a partial build.

Each case starts from ``recipes/crate_tiny.yaml``, breaks one thing, and runs ``unroll build``
in-process (``unroll.cli.main``); a couple also go through ``python -m unroll`` to prove that
nothing but the message reaches the terminal.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from unroll.cli import main
from unroll.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "crate_tiny.yaml"
BASE: dict = yaml.safe_load(TINY.read_text())
MAX_LINES = 8


# --- ways to break a recipe -------------------------------------------------------------------


def put(dotted: str, value: Any) -> Callable[[dict], None]:
    """Set ``a.b.0.c`` (list items by index) to ``value``."""
    *parents, last = dotted.split(".")

    def mutate(data: dict) -> None:
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def syntax_error(text: str) -> str:
    # `heads: [6` (line 10) opens a flow sequence that line 11, `depth: 12`, cannot continue
    assert "  heads: 6 " in text
    return text.replace("  heads: 6 ", "  heads: [6 ", 1)


# (id, how to break it, extra CLI args, what the message must contain: each a string, or a tuple
#  of equally good phrasings)
#   `mutate` is a dict -> None mutation of the loaded recipe, a text -> text rewrite of the raw
#   file (tagged "text"), or None for "no file at all".
CASES = [
    # -- the list --------------------------------------------------------------------
    pytest.param(("text", syntax_error), [], ["YAML syntax error", "line 11", "expected"], id="yaml-syntax-error"),
    pytest.param(put("architecture.widht", 384), [], ["architecture.widht", "unknown field"], id="unknown-field"),
    pytest.param(put("architecture.width", "wide"), [], ["architecture.width", "valid integer", "'wide'"], id="wrong-type"),
    pytest.param(put("architecture.depth", -3), [], ["architecture.depth", ("greater than 0", "greater than or equal to 1"), "-3"], id="negative-depth"),
    pytest.param(put("architecture.heads", 5), [], ["heads", "must divide", "width"], id="heads-not-dividing-width"),
    pytest.param(None, [], ["no such recipe file"], id="missing-file"),
    pytest.param(
        put("objective.Rc.term", "compresion"),
        [],
        ["Rc", "'compresion'", "expected one of", "compression"],
        id="unknown-term-name",
    ),
    pytest.param(
        put("layer.0.relax.0", {"neuman": 1}),
        [],
        ["layer.0.relax", "'neuman'", "expected one of", "neumann"],
        id="unknown-relaxation-name",
    ),
    # -- added ---------------------------------------------------------------------------------
    pytest.param(
        put("layer.1.proximal", ["fit", "sparse", "nonneg", "extra"]),
        [],
        ["sparsify", "extra", "not in the objective", "Rc, fit, sparse, nonneg"],
        id="step-term-not-in-objective",
    ),
    pytest.param(
        put("layer.0.relax.5", {"pre_norm": {"epsilon": 1.0e-5}}),
        [],
        ["layer.0.relax", "pre_norm", "epsilon", "arguments: eps"],
        id="relaxation-unknown-argument",
    ),
    pytest.param(
        lambda data: None, ["--set", "architecture.depth=-3"], ["architecture.depth", ("greater than 0", "greater than or equal to 1"), "-3"],
        id="set-negative-depth",
    ),
    # -- found while writing these tests -------------------------------------------------------
    pytest.param(
        lambda data: None, ["--set", "architecture.depth=[1"], ["--set", "architecture.depth", "'[1'", "YAML"],
        id="set-value-not-yaml",
    ),
    pytest.param(
        put("architecture.heads", "[six]"), [], ["architecture.heads", "valid integer", "'[six]'"],
        id="value-with-brackets",
    ),
    pytest.param(
        put("layer.0.relax.0", {"neumann": 0}),
        [],
        ["layer.0.relax", "neumann", "order", ("at least 1", "greater than or equal to 1"), "found 0"],
        id="relaxation-argument-out-of-range",
    ),
    # -- decoders (issue 3) --------------------------------------------------------------------
    pytest.param(
        put("decoder", {"depth": 2, "layer": "reverse"}), [],
        ["decoder.layer", "'invert'", "list of steps", "'reverse'"], id="decoder-layer-not-invert-or-steps",
    ),
    pytest.param(
        put("decoder", {"depth": 2, "mask_ratio": 1.5}), [], ["decoder.mask_ratio", "less than 1", "1.5"],
        id="mask-ratio-out-of-range",
    ),
    pytest.param(
        lambda data: (put("decoder", {"depth": 2})(data), put("layer.1.decode", "decoupled")(data)), [],
        ["step sparsify", "decode: decoupled", "undone"], id="inverting-a-step-that-decodes",
    ),
    pytest.param(
        put("decoder", {"depth": 2, "layer": [{"name": "s", "synthesis": ["sparse"]}]}), [],
        ["step s", "synthesis", "dictionary (lasso)"], id="synthesis-without-a-dictionary",
    ),
    # -- hardening (issue 13): each class a hostile or careless recipe fell into -----------------
    pytest.param(("text", lambda t: t.encode() + b"extra: \xff\n"), [],
                 ["not UTF-8", "0xff", f"line {len(TINY.read_text().splitlines()) + 1} "], id="not-utf8"),
    pytest.param(("text", lambda t: t + "deep: " + "[" * 3000 + "]" * 3000 + "\n"), [], ["nested deeper than 32"],
                 id="deep-nesting"),
    pytest.param(("text", lambda t: t + BOMB), [], ["100,000 values", "aliases"], id="alias-bomb"),
    pytest.param(("text", lambda t: t.replace("  depth: 12", "  depth: !!int 'abc'")), [],
                 ["cannot be read", "'abc'"], id="int-tag-on-text"),
    pytest.param(("text", lambda t: t + "name: again\n"), [], ["duplicate key 'name'", "line"], id="duplicate-key"),
    pytest.param(("text", lambda t: t + "x: !!python/object/apply:os.system ['true']\n"), [],
                 ["constructor", "python/object"], id="python-tag"),
    pytest.param(put("objective.Rc.term", {}), [], ["Rc", "unknown term", "expected one of"], id="term-kind-a-mapping"),
    pytest.param(put("objective.Rc.weight", 10**400), [], ["Rc", "weight", "finite number", "400 digits"], id="huge-weight"),
    pytest.param(put("objective.Rc.weight", float("nan")), [], ["Rc", "weight", "finite number"], id="nan-weight"),
    pytest.param(put("objective.Rc.epsilon", 0.01), [], ["Rc", "unknown argument 'epsilon'", "arguments: eps"],
                 id="unknown-term-argument"),
    pytest.param(put("objective.Rc.eps", float("inf")), [], ["Rc", "eps must be a finite number"], id="infinite-term-argument"),
    pytest.param(put("layer.0.gradient", []), [], ["layer.0.gradient", "at least 1"], id="empty-gradient-list"),
    pytest.param(put("layer.0.step_size", float("inf")), [], ["layer.0.step_size", ("finite", "less than or equal")],
                 id="infinite-step-size"),
    pytest.param(put("layer.0.name", "a.b"), [], ["layer.0.name", "identifier", "'a.b'"], id="step-name-with-a-dot"),
    pytest.param(put("layer.0.name", "forward"), [], ["layer.0.name", "reserved"], id="step-name-forward"),
    pytest.param(put("layer.0.name", ""), [], ["layer.0.name", "identifier"], id="step-name-empty"),
    pytest.param(put("layer.1.name", "compress"), [], ["layer", "unique", "compress, compress"], id="step-names-repeat"),
    pytest.param(put("name", "../../x"), [], ["field name", "one file name", "'../../x'"], id="name-escapes-build"),
    pytest.param(put("name", "/tmp/x"), [], ["field name", "one file name"], id="name-absolute"),
    pytest.param(put("architecture.width", 10**6), [], ["architecture.width", "less than or equal to 16384"], id="huge-width"),
    pytest.param(put("architecture.depth", 10**5), [], ["architecture.depth", "less than or equal to 128"], id="huge-depth"),
    pytest.param(put("layer.0.relax.0", {"neumann": 1000}), [], ["neumann", "order", "less than or equal to 16"],
                 id="huge-neumann-order"),
    pytest.param(put("layer.1.iterations", 1000), [], ["layer.1.iterations", "less than or equal to 64"], id="huge-iterations"),
    pytest.param(put("architecture.patch_size", 1), ["--set", "architecture.image_size=8192"], ["65,536"], id="too-many-tokens"),
    pytest.param(lambda data: None, ["--set", "layer.99.name=x"], ["--set layer.99.name", "not an item of a list of 2"],
                 id="set-index-out-of-range"),
    pytest.param(lambda data: None, ["--set", "name.x=1"], ["--set name.x", "name is a value"], id="set-into-a-value"),
    pytest.param(lambda data: None, ["--set", "layer.²=1"], ["layer.²", "not an item of a list of 2"], id="set-unicode-index"),
    pytest.param(lambda data: None, ["--set", "layer." + "9" * 5000 + ".name=x"], ["not an item of a list of 2"],
                 id="set-index-of-5000-digits"),
    pytest.param(lambda data: None, ["--set", "objective.fit.expansion" + ".a" * 25 + "=" + "[" * 12 + "1" + "]" * 12],
                 ["nested deeper than 32"], id="set-nests-too-deep"),
    pytest.param(put("layer.1.iterations", 64), [], ["65 iterations in one layer", "at most 64"], id="layer-iterations"),
    pytest.param(put("layer.1.iterations", 60), ["--set", "architecture.depth=12"], ["732 unrolled steps", "at most 512"],
                 id="unrolled-steps"),
    pytest.param(("text", lambda t: t + "# " + "x" * (1 << 20) + "\n"), [], ["bytes", "at most 1,048,576"], id="huge-file"),
]

#: "billion laughs": nine levels of nine aliases each, 387 million values once expanded
BOMB = "lol0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9))


def write_recipe(tmp_path: Path, mutate) -> Path:
    path = tmp_path / "broken.yaml"
    if mutate is None:
        return path  # never written: the missing-file case
    if isinstance(mutate, tuple):
        _, rewrite = mutate
        text = rewrite(TINY.read_text())
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    else:
        data = copy.deepcopy(BASE)
        mutate(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- checks -------------------------------------------------------------------------------------


def flat(text: str) -> str:
    """Undo any wrapping of the message at the console width (rich wraps at 80 columns off a terminal)."""
    return " ".join(text.split())


def check_message(rc: int | None, stderr: str, path: Path, must_contain: list[str | tuple[str, ...]], out: Path) -> None:
    lines = stderr.strip().splitlines()
    # a traceback is long: show its first lines and its last (the exception) in the failure
    excerpt = lines if len(lines) <= 24 else [*lines[:6], f"... {len(lines) - 18} lines ...", *lines[-12:]]
    shown = "\n".join(["--- stderr ---", *excerpt, "--- end ---"])

    def fail(why: str) -> None:
        pytest.fail(f"{why}\n{shown}")

    if "Traceback" in stderr or "╭─" in stderr:
        fail("a traceback reached the user")
    if rc != 2:
        fail(f"exit code {rc}, expected 2")
    if not lines or not lines[0].startswith("error: "):
        fail("expected 'error: <file>: <message>'")
    if len(lines) > MAX_LINES:
        fail(f"{len(lines)} lines, expected at most {MAX_LINES}")
    # the path may be folded by the wrapping; compare with all whitespace removed
    if "".join(str(path).split()) not in "".join(stderr.split()):
        fail(f"the message does not name the file {path}")
    for needle in must_contain:
        options = needle if isinstance(needle, tuple) else (needle,)
        if not any(option in flat(stderr) for option in options):
            fail(f"the message does not say {' or '.join(map(repr, options))}")
    if out.exists():
        fail(f"{out} was written: {sorted(p.name for p in out.rglob('*'))}")


def run_in_process(args: list[str]) -> tuple[int | None, str]:
    """``unroll.cli.main(args)``; an exception escaping it is reported as the traceback it would print."""
    try:
        return main(args), ""
    except BaseException:  # noqa: BLE001 - any escape is a failure, shown in the assertion
        return None, traceback.format_exc()


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, extra, must_contain", CASES)
def test_broken_recipe_fails_with_a_short_message(tmp_path, capsys, mutate, extra, must_contain):
    path = write_recipe(tmp_path, mutate)
    out = tmp_path / "out"
    rc, escaped = run_in_process(["build", str(path), "--out", str(out), *extra])
    captured = capsys.readouterr()
    check_message(rc, captured.err + escaped, path, must_contain, out)
    assert captured.out == "", f"nothing should reach stdout before the error, found:\n{captured.out}"


@pytest.mark.parametrize(
    "mutate, extra, must_contain",
    [case for case in CASES if case.id in ("yaml-syntax-error", "set-negative-depth", "set-value-not-yaml")],
)
def test_no_traceback_reaches_the_terminal(tmp_path, mutate, extra, must_contain):
    path = write_recipe(tmp_path, mutate)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    proc = subprocess.run(
        [sys.executable, "-m", "unroll", "build", str(path), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=60, env=env,
    )
    check_message(proc.returncode, proc.stderr, path, must_contain, out)
    assert proc.stdout == "", f"nothing should reach stdout, found:\n{proc.stdout}"


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a recipe means the number
    path = tmp_path / "exponents.yaml"
    path.write_text(TINY.read_text().replace("lam: 0.1", "lam: 1e-1, weight: 1e-3"))
    recipe = load_recipe(path)
    assert recipe.objective["sparse"]["lam"] == 0.1 and recipe.objective["sparse"]["weight"] == 0.001
