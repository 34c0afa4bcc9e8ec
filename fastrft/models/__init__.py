"""Native decoders (Llama, Qwen2, Qwen3, OLMo-2) and their loaders. Knows nothing about RL."""

from fastrft.models.config import FAMILIES, ArchConfig
from fastrft.models.decoder import CausalLM, packed_positions
from fastrft.models.embedded import DEFAULT_MODEL
from fastrft.models.kv_cache import KVCache
from fastrft.models.loader import load_model, resolve_dtype
from fastrft.models.paged import PagedMeta
from fastrft.models.tokenizer import load_tokenizer

__all__ = ["FAMILIES", "ArchConfig", "CausalLM", "KVCache", "DEFAULT_MODEL", "load_model", "load_tokenizer",
           "packed_positions", "resolve_dtype", "PagedMeta"]
