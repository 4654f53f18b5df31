"""Engine configuration (frozen data, parsed from flags in `jaxinfer.bootstrap`) and its validation.

Pure host code: no JAX. A bad value is a `ConfigError` naming the flag, the value and the limit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.config import ConfigError

ATTENTION_KINDS = ("auto", "pallas", "xla", "native")
LAYER_LOOPS = ("auto", "scan", "unrolled")
SPECULATIVE_MODES = ("none", "ngram", "draft")
# --kv-dtype -> the cache's storage dtype (None: the model's dtype); see jaxinfer.kv_cache
KV_DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "int8": "int8", "fp8_e4m3": "float8_e4m3fn"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # decode slots in total (split evenly over data shards)
    page_size: int = 16
    max_context: int = 1024  # prompt + generated tokens per request
    prefill_chunk: int = 256  # most prompt tokens one request prefills per step
    max_step_tokens: int | None = None  # tokens per data shard per step; None: max(prefill_chunk, slots per shard)
    kv_pages: int | None = None  # per (data, sequence) shard; None: from kv_memory_fraction or enough for all slots
    kv_memory_fraction: float | None = None
    attention: str = "auto"  # auto | pallas | xla | native; resolved by `jaxinfer.platform`
    layer_loop: str = "auto"  # auto | scan | unrolled; resolved by `jaxinfer.platform`
    strict_no_recompile: bool = False
    prefix_cache: bool = True  # reuse the KV pages of prompt prefixes computed before (engine.prefix_cache)
    min_bucket: int | None = None  # smallest token bucket; None: the platform's
    speculative: str = "none"  # none | ngram | draft (jaxinfer.engine.speculation)
    num_speculative_tokens: int = 4  # K: proposals per verify window
    speculative_adaptive: bool = True  # slots speculate only while it pays (else whenever there are proposals)
    kv_dtype: str = "auto"  # KV cache storage: auto (the model's dtype) | float32 | bfloat16 | int8 | fp8_e4m3

    def validate(self, data_shards: int, model_limit: int) -> None:
        def bad(field, limit):
            return ConfigError(f"--{field.replace('_', '-')} {getattr(self, field)} {limit}")

        if self.max_slots < data_shards or self.max_slots % data_shards:
            raise bad("max_slots", f"must be a positive multiple of the mesh's data axis ({data_shards})")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise bad("page_size", "must be a power of two")
        if not 1 <= self.max_context <= model_limit:
            raise bad("max_context", f"must be in [1, {model_limit}] (the model's max_position_embeddings)")
        if self.prefill_chunk < 1:
            raise bad("prefill_chunk", "must be >= 1")
        if self.max_step_tokens is not None and self.max_step_tokens < self.max_slots // data_shards:
            raise bad(
                "max_step_tokens",
                f"must be >= the slots per data shard ({self.max_slots // data_shards}), "
                "so every decoding slot fits in one step",
            )
        if self.kv_pages is not None and self.kv_pages < 1:
            raise bad("kv_pages", "must be >= 1")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction < 1:
            raise bad("kv_memory_fraction", "must be in (0, 1)")
        if self.attention not in ATTENTION_KINDS:
            raise bad("attention", "must be one of " + ", ".join(ATTENTION_KINDS))
        if self.layer_loop not in LAYER_LOOPS:
            raise bad("layer_loop", "must be one of " + ", ".join(LAYER_LOOPS))
        if self.min_bucket is not None and self.min_bucket < 1:
            raise bad("min_bucket", "must be >= 1")
        check_kv_dtype(self.kv_dtype)
        if self.speculative not in SPECULATIVE_MODES:
            raise bad("speculative", "must be one of " + ", ".join(SPECULATIVE_MODES))
        if self.speculative != "none":
            k = self.num_speculative_tokens
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise bad("num_speculative_tokens", "must be an integer >= 1")
            budget = self.step_budget(data_shards)
            if k + 1 > budget:
                raise bad(
                    "num_speculative_tokens",
                    f"needs K + 1 = {k + 1} tokens per step, above the step budget of {budget} "
                    "(--max-step-tokens, else max(--prefill-chunk, slots per data shard))",
                )
            if k + 1 >= self.max_context:
                raise bad("num_speculative_tokens", f"must be below --max-context {self.max_context} - 1")

    def cache_dtype(self, model_dtype) -> str:
        """The KV cache's storage dtype name (`--kv-dtype`; auto: the model's dtype, e.g. 'bfloat16')."""
        return KV_DTYPES[self.kv_dtype] or str(np.dtype(model_dtype))

    def step_budget(self, data_shards: int) -> int:
        """Tokens per data shard in the largest step (the largest bucket)."""
        return self.max_step_tokens or max(self.prefill_chunk, self.max_slots // data_shards)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt: one position of the context is kept for the first output token."""
        return self.max_context - 1


def check_kv_dtype(value) -> None:
    """`--kv-dtype` is one of KV_DTYPES (checked by the front ends before any model loads, and by `validate`)."""
    if value not in KV_DTYPES:
        raise ConfigError(f"--kv-dtype {value} must be one of " + ", ".join(KV_DTYPES))


def token_buckets(budget: int, smallest: int, multiple: int = 1) -> tuple[int, ...]:
    """Token counts per data shard that steps are padded to (one compiled step each): powers of two
    from `smallest` (the platform's smallest bucket) up to the step's token `budget`, plus the budget,
    each rounded up to a multiple of `multiple` (the sequence shards, which split a step's tokens)."""
    sizes = {min(max(smallest, 2**i), budget) for i in range(budget.bit_length() + 1)} | {budget}
    return tuple(sorted({-(-b // multiple) * multiple for b in sizes}))
