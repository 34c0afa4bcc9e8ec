"""Builds only the C++ extension fastrft._engine (csrc/); all metadata lives in pyproject.toml.

The extension is optional: without a C++17 compiler (or pybind11) the install still succeeds and
fastrft.engine.bookkeeping falls back to the pure-Python twins, with a warning.
"""

import sys
from glob import glob

from setuptools import setup

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
except ImportError:  # e.g. --no-build-isolation without pybind11: Python twins only
    ext_modules, cmdclass = [], {}
else:
    ext_modules = [Pybind11Extension("fastrft._engine", sorted(glob("csrc/*.cpp")), cxx_std=17, optional=True,
                                     extra_compile_args=["/O2", "/fp:strict"] if sys.platform == "win32" else
                                     # No contraction into FMAs: the sampler's noise must round as the spec does.
                                     ["-O3", "-g0", "-ffp-contract=off"])]
    # The files compile in parallel, without debug info: a fifth off a clean install on 2 cores.
    ParallelCompile("FASTRFT_BUILD_JOBS").install()
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
