"""Greedy decoding by re-running the dense forward over a fixed-size window (one compile).

Slow but obviously right: no KV cache, no batching. Used to check the model itself against
published outputs before the engine is involved.
"""

import numpy as np


def greedy_dense(model, prompt_ids, max_new_tokens: int, eos_ids=(), window: int = 256) -> list[int]:
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        if len(ids) > window:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds the window of {window}")
        tokens = np.zeros((1, window), np.int32)
        positions = np.full((1, window), -1, np.int32)
        tokens[0, : len(ids)] = ids
        positions[0, : len(ids)] = np.arange(len(ids))
        nxt = int(np.argmax(model.logits(tokens, positions)[0, len(ids) - 1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos_ids:
            break
    return out
