"""The README's and the tutorials' code blocks run: python blocks in one namespace per document,
``unroll ...`` shell lines through the real CLI."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs/tutorials").glob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    # the blocks name recipes/ and docs/ relative to the checkout and write build/...: run them in
    # a temporary folder that sees the checkout's recipes and docs, so nothing lands in the checkout
    for name in ("recipes", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path / "token-cache"))  # a language model's tokens: not in ~/.cache
    namespace: dict = {}
    code = blocks(doc, "python")
    assert code or doc.name == "README.md", f"{doc.name} has no python blocks"
    for block in code:
        exec(compile(block, str(doc), "exec"), namespace)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if d.parent.name == "tutorials"], ids=lambda p: p.name)
def test_cli_blocks_run(doc, tmp_path):
    lines = [l for b in blocks(doc, "bash") for l in b.splitlines() if l.startswith("unroll ")]
    assert lines
    for line in lines:
        args = shlex.split(line)[1:]
        args = [str(tmp_path / a) if a.startswith("build/") else a for a in args]
        result = subprocess.run([sys.executable, "-m", "unroll", *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        if args[0] == "explain":
            assert "Z⁺ = " in result.stdout and "computed:" in result.stdout
        if args[:2] == ["explain", "recipes/crate_base.yaml"]:
            assert "ReLU(Y - η λ 1 - η Dᵀ (D Y - Y))" in result.stdout
