"""The documentation's Python examples run, and its claims about PyTorch hold.

Every fenced block whose info string is exactly ``python`` in README.md and
docs/**/*.md is executed. Each README block runs on its own, as pasted into a
fresh interpreter (a subprocess in an empty temporary folder), so every block
carries its own imports and model; the blocks of a docs page run in order in
one shared namespace, in a temporary working directory. Fence a block as
``text`` to show code without running it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block in a markdown text."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if m.group("info").strip() == "python":
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _documents() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    readme = ROOT / "README.md"
    return ([readme] if readme.is_file() else []) + docs


DOCUMENTS = [p for p in _documents() if python_blocks(p.read_text(encoding="utf-8"))]
README = ROOT / "README.md"
README_BLOCKS = python_blocks(README.read_text(encoding="utf-8")) if README.is_file() else []


def test_the_extractor_finds_only_python_blocks():
    text = "intro\n```python\na = 1\n```\n```py\nnot run\n```\n  ```python\n  b = a + 1\n  ```\n```text\nx\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = a + 1\n")]


def test_concepts_page_has_examples():
    assert ROOT / "docs" / "concepts.md" in DOCUMENTS
    assert len(python_blocks((ROOT / "docs" / "concepts.md").read_text(encoding="utf-8"))) >= 4


def test_readme_has_no_python_fragments():
    """Code in the README is either a runnable ```python block or not Python at all."""
    infos = re.findall(r"^```[ \t]*(\w*)", README.read_text(encoding="utf-8"), re.M)
    assert "py" not in infos
    assert len(README_BLOCKS) >= 9


@pytest.mark.parametrize(("line", "source"), README_BLOCKS, ids=[f"README.md:{n}" for n, _ in README_BLOCKS])
def test_readme_block_runs_as_pasted_into_a_fresh_interpreter(line, source, tmp_path):
    script = tmp_path / "block.py"
    # Padding keeps traceback line numbers equal to the README's.
    script.write_text("\n" * (line - 1) + source, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if p != README], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    ran = 0
    for line, source in blocks:
        # Padding keeps traceback line numbers equal to the markdown file's.
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        exec(code, namespace)
        ran += 1
    assert blocks and ran == len(blocks)  # every block ran to its end
    assert len(namespace) > 2  # and defined what the page goes on to use (beyond __name__, __builtins__)


def test_no_grad_leaves_requires_grad_untouched():
    """no_grad does not set requires_grad=False on parameters: flags stay as they were,
    only results computed inside carry no graph."""
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    net[1].bias.requires_grad_(False)  # a mix of flags, to see that none is rewritten
    flags = [p.requires_grad for p in net.parameters()]
    with torch.no_grad():
        inside = [p.requires_grad for p in net.parameters()]
        out = net(torch.randn(2, 3))
        assert not torch.is_grad_enabled()
    assert inside == flags == [True, True, True, False]
    assert [p.requires_grad for p in net.parameters()] == flags
    assert out.grad_fn is None and not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()
    # The same parameters still train once outside the block: nothing was frozen.
    net(torch.randn(2, 3)).sum().backward()
    assert net[0].weight.grad is not None and net[1].bias.grad is None


def test_no_grad_does_not_stop_an_optimizer_or_batchnorm_statistics():
    bn = nn.BatchNorm1d(3)
    bn.weight.grad = torch.ones(3)
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    with torch.no_grad():
        bn(torch.randn(4, 3) + 2.0)
        opt.step()
    assert bn.running_mean.abs().sum() > 0
    assert torch.equal(bn.weight.detach(), torch.full((3,), 0.5))


def test_eval_mode_does_not_freeze():
    torch.manual_seed(0)
    net = nn.Linear(3, 1).eval()
    before = net.weight.detach().clone()
    net(torch.randn(2, 3)).sum().backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert net.weight.requires_grad and not net.weight.equal(before)


def test_api_reference_lists_every_public_name():
    """Each name in ``layerfreeze.__all__`` has an entry in docs/api.md."""
    import layerfreeze

    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    entries = set(re.findall(r"^::: layerfreeze\.(\w+)\s*$", api, flags=re.M))
    missing = [name for name in layerfreeze.__all__ if name not in entries and not name.startswith("__")]
    assert not missing, f"docs/api.md lacks {missing}"
