"""The draft model built from its target: its config, its reduced head's token ids, its first weights.

The draft has the target's vocabulary, hidden size, heads and RoPE, and `layers` decoder layers. Its
head covers only the `head_vocab` tokens the target writes most often (EAGLE-3's reduced draft
vocabulary): a 2-layer SmolLM2 draft with the full tied 49,152 x 576 head would read ~140 MB per
token, with 8,192 columns ~47 MB. The draft's logits of every other id are masked, so the target
never accepts them from the draft, and rejection sampling stays exact (q has smaller support).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.config import ModelConfig

INIT_LAYERS = ("first", "spread", "random")  # the first is the default


def draft_config(target: ModelConfig, layers: int, head_vocab: int, name: str) -> ModelConfig:
    """The target's architecture with `layers` layers and (head_vocab > 0) an untied reduced head; with
    head_vocab 0, the target's own full head (tied as the target's is)."""
    return target.replace(
        name=name,
        num_layers=layers,
        head_vocab=head_vocab,
        tie_embeddings=target.tie_embeddings and not head_vocab,
    )


def choose_head_ids(
    tokens: np.ndarray, answer_mask: np.ndarray, vocab: int, head_vocab: int, must: tuple[int, ...]
) -> np.ndarray:
    """int32 [head_vocab], ascending: the `must` ids (end-of-generation tokens), then the ids most frequent
    in the target's answers, then in its prompts, then the lowest ids not yet chosen (a BPE vocabulary
    lists its commonest merges first). Ties go to the lower id, so the choice is deterministic."""
    answers = np.bincount(tokens[answer_mask], minlength=vocab)[:vocab]
    prompts = np.bincount(tokens[~answer_mask], minlength=vocab)[:vocab]
    ids = np.arange(vocab)
    # one sort: must first, then by answer count, prompt count (descending), id (ascending)
    forced = np.isin(ids, np.asarray(must, np.int64))
    order = np.lexsort((ids, -prompts, -answers, ~forced))
    return np.sort(order[:head_vocab]).astype(np.int32)


def head_coverage(tokens: np.ndarray, mask: np.ndarray, head_ids: np.ndarray) -> float:
    """Fraction of the masked tokens the head can propose at all (an upper bound on any acceptance)."""
    picked = tokens[mask]
    return float(np.isin(picked, head_ids).mean()) if picked.size else 0.0


def target_layer_indices(target_layers: int, layers: int, how: str) -> list[int] | None:
    """Which target layers initialise the draft's: `first` the first `layers`, `spread` evenly from first
    to last, `random` none (fresh initialisation). Measured on SmolLM2 (2 layers, head 8192, held-out
    batch before training): `first` starts at loss 14.7 and acceptance 0.032, `spread` (layers 0 and
    29: the last layer never saw the first's output) at 65 and 0.0, `random` at 53 and 0.012. On
    stories260K (1 layer) target-initialised layers reached 0.55 acceptance in 200 steps, random 0.31."""
    if how == "random":
        return None
    if how == "first":
        return list(range(layers))
    if layers == 1:
        return [0]
    return [round(i * (target_layers - 1) / (layers - 1)) for i in range(layers)]


def initial_params(target_params: dict, target: ModelConfig, draft: ModelConfig, head_ids, how: str, seed: int):
    """The draft's logical (unpadded, scan-layout) parameters as numpy arrays.

    `target_params`: the target's parameters on the host (scan layout, unpadded): the embedding table
    is copied, the head starts as the target's head restricted to `head_ids` (for a tied target, its
    embedding rows), the final norm is copied, and the layers are copies of target layers (`how`) or
    a fresh random initialisation (`jaxinfer.model.params.init_params` with `seed`).
    """
    import jax

    from jaxinfer.model import params as P
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.sharding import make_mesh

    layout = plan_layout(draft, 1, quiet=True)
    fresh = P.init_params(draft, layout, make_mesh("1x1", jax.devices("cpu")[:1]), seed=seed)
    out = jax.tree.map(np.asarray, fresh)
    out["embed"] = np.array(target_params["embed"], np.float32)
    out["final_norm"] = {"scale": np.array(target_params["final_norm"]["scale"], np.float32)}
    target_head = target_params["embed"].T if target.tie_embeddings else target_params["lm_head"]  # [E, V]
    if draft.head_vocab:
        out["lm_head"] = np.array(np.asarray(target_head)[:, head_ids], np.float32)
        out["head_ids"] = np.asarray(head_ids, np.int32)
    elif not draft.tie_embeddings:
        out["lm_head"] = np.array(target_head, np.float32)
    picks = target_layer_indices(target.num_layers, draft.num_layers, how)
    if picks is not None:
        out["layers"] = jax.tree.map(lambda a: np.array(np.asarray(a)[picks], np.float32), target_params["layers"])
    return out
