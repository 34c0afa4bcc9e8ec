"""Native decoders (Llama, Qwen2, Qwen3, OLMo-2) and their loaders. Knows nothing about RL.

Names are imported on first use (see fastrft._lazy), so that reading a default does not import torch."""

from fastrft._lazy import lazy_exports

_EXPORTS = {"FAMILIES": "fastrft.models.config", "ArchConfig": "fastrft.models.config",
            "CausalLM": "fastrft.models.decoder", "packed_positions": "fastrft.models.decoder",
            "DEFAULT_MODEL": "fastrft.models.embedded", "KVCache": "fastrft.models.kv_cache",
            "load_model": "fastrft.models.loader", "resolve_dtype": "fastrft.models.loader",
            "PagedMeta": "fastrft.models.paged", "load_tokenizer": "fastrft.models.tokenizer"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
