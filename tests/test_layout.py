"""The layout rules of docs/architecture.md ("Rules the code keeps"), checked on the source (no import, no
torch): small modules and classes, no import cycle, the round loop as stage calls, no stage on the global
RNG, no branch on exactness outside the backends, no bench script importing another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastrft": ROOT / "fastrft"}
MODULE_LINES, KERNEL_MODULE_LINES, CLASS_LINES = 300, 350, 250  # a kernel module holds a kernel, its launcher and gate
OVER_THE_LIMIT = {"fastrft/config.py"}  # the field table of every flag; its docstring says why


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGES.items():
        for p in base.rglob("*.py"):
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of this project that ``name`` imports anywhere in its file (function bodies too)."""

    def known(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        out |= {t for t in map(known, targets) if t and t != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_classes_are_small():
    too_long = []
    for path in (ROOT / "fastrft").rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        limit = KERNEL_MODULE_LINES if "kernels" in path.parts else MODULE_LINES
        if len(text.splitlines()) > limit and rel not in OVER_THE_LIMIT:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                too_long.append(f"{rel}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
    for rel in OVER_THE_LIMIT:
        assert "limit" in ast.get_docstring(ast.parse((ROOT / rel).read_text())), f"{rel} must say why it is long"


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_round_only_calls_stages():
    """The round reads top to bottom: a short function without loops."""
    fn = _function(ROOT / "fastrft/loop/round.py", "train_round")
    assert fn.end_lineno - fn.lineno + 1 <= 30
    assert not any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(fn))


LOOP = sorted((ROOT / "fastrft/loop").glob("*.py")) + [ROOT / "fastrft/trainer.py"]
GLOBAL_RNG = {("random", f) for f in ("random", "shuffle", "sample", "choice", "choices", "randint", "seed",
                                       "uniform", "getrandbits")} | {
    ("torch", f) for f in ("rand", "randn", "randint", "randperm", "multinomial", "bernoulli", "normal")}


@pytest.mark.parametrize("path", LOOP, ids=lambda p: p.name)
def test_no_stage_draws_from_the_global_rng(path):
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)]
    assert [ast.unparse(c.func) for c in calls if (c.func.value.id, c.func.attr) in GLOBAL_RNG] == []


def test_seed_streams_are_defined_in_one_place():
    """Only fastrft/loop/seeds.py derives generation seeds and shuffle orders."""
    users = [p.name for p in LOOP if p.name != "seeds.py"
             and ("request_seed(" in p.read_text() or "random.Random(" in p.read_text())]
    assert users == []


def test_the_loop_never_calls_up_into_the_facade():
    """fastrft/loop is built by fastrft.trainer and never imports it: the round and the run loop are built
    once, top-down (issue 33)."""
    mods = _modules()
    users = sorted(n for n, p in mods.items()
                   if n.startswith("fastrft.loop") and "fastrft.trainer" in _imports(n, p, mods))
    assert users == []


# The modules that may decide how a model computes: the backends (fastrft.models.ops and its registered
# classes) and the exact mode's own numerics. Everywhere else asks the model's backend.
BACKEND_MODULES = {"fastrft/models/ops.py", "fastrft/models/ops_triton.py", "fastrft/models/exact.py",
                   "fastrft/models/tiled_attention.py", "fastrft/models/row_rules.py"}
EXACT_SWITCHES = {"exact_logprobs", "exact_backend", "exact_head", "_exact", "set_exact"}


def _switches(sub: ast.AST, test: ast.AST) -> bool:
    name = sub.attr if isinstance(sub, ast.Attribute) else sub.id if isinstance(sub, ast.Name) else None
    if name in EXACT_SWITCHES:
        return True
    if name == "exact" and isinstance(sub, ast.Attribute) and not ast.unparse(sub.value).endswith("ops"):
        return True
    return (isinstance(sub, ast.Constant) and sub.value in ("exact-torch", "exact-triton", "triton", "torch")
            and isinstance(test, ast.Compare) and "exact" in ast.unparse(test))


def _exactness_branches(tree: ast.AST) -> list[str]:
    """Conditions that switch on the exact mode: an if / ternary / while / assert / boolean operand reading a
    switch-like name, comparing anything with the backends' names, or testing a model's ``exact`` flag
    other than its backend's (``ops.exact``, a capability the learner reads once)."""
    found = []
    for node in ast.walk(tree):
        tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else []
        tests += node.values if isinstance(node, ast.BoolOp) else []
        for test in tests:
            if any(_switches(sub, test) for sub in ast.walk(test)):
                found.append(ast.unparse(test))
    return found


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "fastrft").rglob("*.py")
                                        if str(p.relative_to(ROOT)) not in BACKEND_MODULES),
                         ids=lambda p: str(p.relative_to(ROOT / "fastrft")))
def test_no_branch_on_exactness_outside_the_backends(path):
    assert _exactness_branches(ast.parse(path.read_text())) == []


def test_the_exactness_check_finds_the_old_switches():
    """Today's code would pass vacuously if the check could not see a switch: the forms that f9f3402 had."""
    old = ('if self.exact == "triton":\n    pass\n'
           'x = a if getattr(self.model, "exact_backend", None) == "torch" else b\n'
           'if self.runner.exact_head:\n    pass\n'
           'old = (f() if self.exact_logprobs else g()) if multi else None\n')
    assert len(_exactness_branches(ast.parse(old))) == 4
    assert _exactness_branches(ast.parse("x = f if ops.exact else g\n")) == []


def test_the_cpu_exact_path_does_not_import_triton_modules():
    """The exact CPU backend and what it uses import none of the exact mode's Triton modules (fastrft.numerics
    holds what they share)."""
    mods = _modules()
    seen, todo = set(), ["fastrft.models.exact"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(name, mods[name], mods)
    assert sorted(n for n in seen if n.startswith("fastrft.kernels.exact") or n == "fastrft.models.ops_triton") == []


def test_no_bench_script_imports_another():
    """The bench scripts share code through bench/harness.py only (issue 33)."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"harness"}
    offenders = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{p.name}: {n}" for n in names if n.split(".")[0] in scripts]
    assert offenders == []
