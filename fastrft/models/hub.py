"""Models by Hugging Face hub id: ``--model Qwen/Qwen2.5-1.5B-Instruct`` (or ``...@<revision>``: a branch,
tag or commit), resolved through huggingface_hub's cache as transformers resolves them.

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when the
model is resolved. With ``HF_HUB_OFFLINE=1`` only the cache is used; otherwise missing files are
downloaded, with huggingface_hub's progress bars. Only what fastrft loads is fetched: the configs,
the safetensors weights and the tokenizer files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastrft.errors import ModelLoadError

#: owner/name, optionally @revision: what the hub accepts as a model repository id.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
_TRUE = ("1", "on", "yes", "true")


def is_hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None and not name.startswith((".", "/", "~"))


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def snapshot(name: str) -> Path:
    """The local directory of hub model ``name`` (owner/name[@revision]), downloaded if needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    m = HUB_ID.fullmatch(name)
    repo, revision = m.group("repo"), m.group("revision")
    where = f"the Hugging Face cache {cache_dir()}"
    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=str(cache_dir()),
                                      allow_patterns=PATTERNS, local_files_only=offline()))
    except LocalEntryNotFoundError:
        if offline():
            raise ModelLoadError(f"model {name!r} is not in {where}, and HF_HUB_OFFLINE is set, so it cannot be "
                                 "downloaded: unset HF_HUB_OFFLINE on a machine with network access (or point "
                                 "HF_HOME at a cache that holds it), or pass a local directory") from None
        raise ModelLoadError(f"model {name!r}: not in {where} and the hub cannot be reached; connect to the "
                             "network, or pass a local directory (HF_HUB_OFFLINE=1 uses the cache only)") from None
    except GatedRepoError:
        raise ModelLoadError(f"model {name!r} is gated on the hub: accept its licence on huggingface.co and log "
                             "in (huggingface-cli login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model {name!r}: no such repository on the hub (or it is private: log in with "
                             "huggingface-cli login, or set HF_TOKEN); check the id") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model {name!r}: the hub repository has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"model {name!r}: download from the hub failed ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); retry, or pass a local directory") from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {name!r}: the hub repository has no config.json at {path}: it is not a "
                             "transformers model")
    return path
