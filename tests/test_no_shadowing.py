"""Nothing in the tree shadows an installed package or a standard-library module.

Python puts the repository root on sys.path for ``python -m ...``, ``python -c``, a notebook or torchrun
started in a clone; pytest puts tests/ there; ``python bench/x.py`` puts bench/. A regular package or a
module in one of those folders wins over an installed one of the same name. On 2026-12-07 that broke
every test: transformers 5.25 brought Hugging Face's ``kernels`` package and imports it when a model
module loads, and our top-level ``kernels/`` (now ``fastrft/kernels/``) answered instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The folders that land on sys.path when something runs from a clone (see the docstring).
PATH_ROOTS = (ROOT, ROOT / "tests", ROOT / "bench")


def _importable_names(folder: Path) -> set[str]:
    """Top-level names a folder on sys.path provides: modules and regular packages (a folder without
    __init__.py is a namespace portion, which never wins over a regular package)."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def _installed_top_level_names() -> set[str]:
    names = set(sys.stdlib_module_names)
    for top, dists in importlib.metadata.packages_distributions().items():
        if "fastrft" not in {d.lower() for d in dists}:
            names.add(top)
    return names


def test_no_name_in_the_tree_shadows_an_installed_one():
    taken = _installed_top_level_names()
    clashes = {str(folder.relative_to(ROOT.parent)): sorted(_importable_names(folder) & taken)
               for folder in PATH_ROOTS}
    assert {k: v for k, v in clashes.items() if v} == {}
    assert _importable_names(ROOT) <= {"fastrft", "setup"}, "only fastrft is importable from the root"


def test_the_checker_sees_a_shadowing_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "docs").mkdir()  # a namespace portion: harmless
    assert _importable_names(tmp_path) & _installed_top_level_names() >= {"json"}
    assert "kernels" in _importable_names(tmp_path) and "docs" not in _importable_names(tmp_path)


def test_transformers_model_code_imports_from_the_repository_root():
    """transformers' model modules, imported from a process started in the clone (its root first on
    sys.path), with Hugging Face's ``kernels`` installed as transformers >= 5.25 brings it."""
    code = ("import importlib.util, sys\n"
            "import transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2\n"
            "import transformers.models.qwen3.modeling_qwen3, transformers.models.olmo2.modeling_olmo2\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(sys.prefix)\n"
            "print(spec.origin if spec else 'absent')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    prefix, origin = res.stdout.strip().splitlines()[-2:]
    # Installed means under the interpreter's prefix (a .venv inside the clone is fine), never the tree.
    assert origin == "absent" or Path(origin).resolve().is_relative_to(Path(prefix).resolve()), origin
    if origin != "absent":  # today's transformers brings it: the test covers the case that broke
        assert importlib.metadata.distribution("kernels").metadata["Name"].lower() == "kernels"
