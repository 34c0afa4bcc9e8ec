"""What a checkpoint's state.pt holds, and how it is written and read: the payload (tensors and plain
data) with the RNG streams, read back as data only (torch's weights-only unpickler)."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _write_state(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save({**payload, "rng": rng_state()}, f)
        f.flush()
        os.fsync(f.fileno())


def _plain_numpy() -> list:
    """The numpy types a checkpoint holds (numpy's RNG state is an array): allowed, as data only."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.pt, read as data only: tensors, plain Python containers and numbers, numpy
    arrays. torch's weights-only unpickler refuses anything else, so a crafted file (a run directory
    received from someone else) cannot run code when it is resumed or exported; the SHA-256 manifest
    cannot guard against the one who wrote it."""
    with torch.serialization.safe_globals(_plain_numpy()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL:? ([\w.]+)", str(e))
            what = f"a reference to {found.group(1)}" if found else "an object"
            raise pickle.UnpicklingError(
                f"it holds {what}, which is neither a tensor nor plain data, and loading it could run code; "
                "fastrft writes only data, so this file was not written by fastrft or was altered") from None
