"""How a logical model is laid out on a mesh: zero-padding so every sharded dimension divides.

Tensor parallelism splits query heads, KV heads, the MLP hidden dimension and the vocabulary over
the `tensor` axis. When a count does not divide (SmolLM2: 9 query / 3 KV heads on tensor=4), the
weights are padded at load time with zero heads / zero MLP units / zero vocabulary rows, which leaves
every output unchanged:
  - a padded query head has zero q weights and zero rows in o_proj, so it contributes nothing;
  - KV heads fewer than `tensor` are replicated when `tensor` is a multiple of their count, each
    replica serving a share of the group's query heads; otherwise dummy (zero) KV groups are added;
  - zero MLP units give silu(0) * 0 = 0; padded vocabulary logits are cut off before sampling.
"""

from __future__ import annotations

import dataclasses
import logging

from jaxinfer.config import ModelConfig
from jaxinfer.sharding import ceil_to

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Physical (padded) sizes plus where each physical head comes from (None = zero padding)."""

    q_heads: int
    kv_heads: int
    mlp: int
    vocab: int
    q_source: tuple[int | None, ...]  # physical q head -> logical q head
    kv_source: tuple[int | None, ...]  # physical kv head -> logical kv head

    @property
    def q_per_kv(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def padded(self) -> bool:
        return any(s != i for i, s in enumerate(self.q_source)) or any(s != i for i, s in enumerate(self.kv_source))


def plan_layout(config: ModelConfig, tensor: int = 1, quiet: bool = False) -> ModelLayout:
    """Chooses the padded layout of `config` for a tensor-parallel degree of `tensor`."""
    H, K, G = config.num_heads, config.num_kv_heads, config.q_per_kv
    if K % tensor == 0:
        kv_source = tuple(range(K))
        q_source = tuple(range(H))
    elif K < tensor and tensor % K == 0:
        replicas = tensor // K
        per_replica = -(-G // replicas)
        kv_source = tuple(k for k in range(K) for _ in range(replicas))
        q_source = tuple(
            (k * G + r * per_replica + j) if r * per_replica + j < G else None
            for k in range(K)
            for r in range(replicas)
            for j in range(per_replica)
        )
    else:
        kv_pad = ceil_to(K, tensor)
        kv_source = tuple(k if k < K else None for k in range(kv_pad))
        q_source = tuple(k * G + g if k < K else None for k in range(kv_pad) for g in range(G))
    layout = ModelLayout(
        q_heads=len(q_source),
        kv_heads=len(kv_source),
        mlp=ceil_to(config.intermediate_size, tensor),
        vocab=ceil_to(config.vocab_size, tensor),
        q_source=q_source,
        kv_source=kv_source,
    )
    changes = []
    if layout.q_heads != H or layout.kv_heads != K:
        changes.append(f"heads q {H}->{layout.q_heads}, kv {K}->{layout.kv_heads}")
    if layout.mlp != config.intermediate_size:
        changes.append(f"mlp {config.intermediate_size}->{layout.mlp}")
    if layout.vocab != config.vocab_size:
        changes.append(f"vocab {config.vocab_size}->{layout.vocab}")
    if changes and not quiet:
        log.info(
            "tensor=%d does not divide %s: zero-padding %s at load time (outputs unchanged)",
            tensor,
            config.name,
            "; ".join(changes),
        )
    return layout
