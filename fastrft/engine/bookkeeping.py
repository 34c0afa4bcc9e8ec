"""Pick the C++ or the pure-Python block manager and scheduler.

``impl``: "auto" uses the C++ extension ``fastrft._engine`` when it imports, else the Python twins (with
one warning per process); "cpp" insists on C++ (ImportError when it is not built); "python" forces the
twins. A scheduler and its block manager must come from the same implementation.

>>> bm = make_block_manager(64, 16, impl="python")
>>> sched = make_scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
>>> type(sched).__name__
'PyScheduler'
"""

from __future__ import annotations

import functools
import warnings

from fastrft.engine.block_manager import PyBlockManager
from fastrft.engine.scheduler import PyScheduler

IMPLS = ("auto", "cpp", "python")


@functools.cache
def _engine_module():
    """The C++ extension module, or None when it is not built."""
    try:
        from fastrft import _engine
    except ImportError:
        return None
    return _engine


@functools.cache
def _warn_fallback() -> None:  # cached: warns once per process
    warnings.warn("fastrft._engine (the C++ block manager and scheduler) is not built; using the slower "
                  "pure-Python twins. Reinstall with a C++17 compiler (`pip install -e .`) to build it.",
                  RuntimeWarning, stacklevel=4)


def _use_cpp(impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "python":
        return False
    if _engine_module() is not None:
        return True
    if impl == "cpp":
        raise ImportError("impl='cpp' but the C++ extension fastrft._engine is not built: reinstall with a C++17 "
                          "compiler and pybind11 (`pip install -e .`), or pass impl='python'")
    _warn_fallback()
    return False


def make_block_manager(num_blocks: int, block_size: int, impl: str = "auto"):
    """A paged KV block manager of ``num_blocks`` blocks of ``block_size`` (a power of two) tokens."""
    if _use_cpp(impl):
        return _engine_module().BlockManager(num_blocks, block_size)
    return PyBlockManager(num_blocks, block_size)


def make_scheduler(bm, max_num_seqs: int, max_num_batched_tokens: int, impl: str = "auto"):
    """A scheduler over ``bm``. "auto" follows ``bm``'s implementation; an explicit impl that differs
    from it is refused (ValueError): the two classes share state through C++ or Python objects only."""
    eng = _engine_module()
    if isinstance(bm, PyBlockManager):
        bm_impl = "python"
    elif eng is not None and isinstance(bm, eng.BlockManager):
        bm_impl = "cpp"
    else:
        raise TypeError(f"bm must be a block manager from make_block_manager, got {type(bm).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl not in ("auto", bm_impl):
        raise ValueError(f"cannot mix implementations: impl={impl!r} scheduler over a {bm_impl} block manager "
                         f"({type(bm).__name__}); build both with the same impl")
    if bm_impl == "cpp":
        return eng.Scheduler(bm, max_num_seqs, max_num_batched_tokens)
    return PyScheduler(bm, max_num_seqs, max_num_batched_tokens)
