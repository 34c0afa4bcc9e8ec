"""The README's Python examples run as written and return what they show.

Every ```python block of README.md runs, in README order, in one namespace (as if typed into one Python
session), inside one temporary working directory; FASTRFT_HOME is the session's (conftest.py), so the
embedded model is converted at most once per test session. A block with ``>>>`` lines runs as a doctest,
so the outputs it shows are checked; any other block is executed, and must simply not raise.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(section heading, 1-based line of the first code line, source) of each ```python block."""
    blocks = []
    for m in FENCE.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[:m.start()], re.MULTILINE)
        blocks.append((headings[-1] if headings else "", text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _param(section: str, line: int, source: str):
    return pytest.param(section, line, source, id=f"line{line}-{section.split(':')[0].replace(' ', '-')}")


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> tuple[dict, Path]:
    """The namespace and working directory that all blocks share."""
    return {"__name__": "__readme__"}, tmp_path_factory.mktemp("readme")


@pytest.fixture(autouse=True)
def _threads():
    # Overrides conftest's: the examples decode one short prompt at a time, which a second thread does not
    # speed up, and on a CPU shared with other work it made decoding several times slower.
    torch.set_num_threads(1)


def test_readme_has_python_examples():
    sections = {section for section, _, _ in BLOCKS}
    assert {"Python API", "Kernels: the LM-head loss without [N, V] logits"} <= sections


@pytest.mark.parametrize(("section", "line", "source"), [_param(*b) for b in BLOCKS])
def test_readme_block(session, monkeypatch, section, line, source):
    namespace, workdir = session
    monkeypatch.chdir(workdir)
    if re.search(r"^\s*>>>", source, re.MULTILINE):
        name = f"README.md:{line} ({section})"
        test = doctest.DocTestParser().get_doctest(source, namespace, name, str(README), line - 1)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        namespace.update(test.globs)  # the doctest ran on a copy; later blocks see what it defined
        if runner.failures:
            pytest.fail("".join(report), pytrace=False)
    else:
        # Padding puts a traceback's line numbers on the README's own lines.
        exec(compile("\n" * (line - 1) + source, str(README), "exec"), namespace)


def test_the_readme_states_the_demos_own_settings():
    """The Python API section and the demo section describe the config `fastrft demo` runs."""
    import re

    from fastrft.demo import demo_config

    cfg = demo_config()
    text = README.read_text()
    stated = dict(re.findall(r"`(\w+)=([\w.]+)`", text.split("The demo itself uses")[1].split("```")[0]))
    assert stated == {"rounds": str(cfg.run.rounds), "max_new_tokens": str(cfg.rollout.max_new_tokens),
                      "fail_truncated": str(cfg.algo.fail_truncated), "eval_every": str(cfg.eval.eval_every),
                      "train_samples": str(cfg.eval.train_samples), "test_size": str(cfg.eval.test_size)}
    demo = text.split("## The demo")[1].split("It prints a before/after table")[0]
    assert f"{cfg.run.rounds} rounds" in demo and f"{cfg.eval.train_samples} samples" in demo
    assert f"each of {cfg.eval.test_size} other single-digit sums" in demo
    assert f"at rounds 0, {cfg.eval.eval_every} and {cfg.run.rounds}" in demo
