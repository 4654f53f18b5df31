"""Greedy decoding by re-running the dense forward over a fixed-size window (one compile).

Slow but obviously right: no KV cache, no batching. Used to check the model itself against
published outputs before the engine is involved. The window defaults to the smallest multiple of
WINDOW_STEP that holds the longest sequence: every pass attends over the whole window, so a window
much longer than the sequences only costs (4x the tokens and 16x the attention for 256 instead of 64).
"""

import numpy as np

WINDOW_STEP = 64


def fitting_window(lengths) -> int:
    """The smallest multiple of WINDOW_STEP that holds sequences of each of `lengths` tokens."""
    return max(WINDOW_STEP, -(-max(lengths) // WINDOW_STEP) * WINDOW_STEP)


def greedy_dense(model, prompt_ids, max_new_tokens: int, eos_ids=(), window: int | None = None) -> list[int]:
    window = window or fitting_window([len(prompt_ids) + max_new_tokens])
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


def greedy_dense_rows(model, prompts, max_new_tokens, eos_ids=(), window: int | None = None) -> list[list[int]]:
    """`greedy_dense` for several prompts at once: one row each, advanced together (rows of the dense
    forward never see each other), so N prompts cost max(max_new_tokens) forward passes, not their sum.
    `max_new_tokens`: one limit per prompt."""
    window = window or fitting_window([len(p) + m for p, m in zip(prompts, max_new_tokens)])
    ids = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    live = [m > 0 for m in max_new_tokens]
    while any(live):
        if max(len(r) for r in ids) > window:
            raise ValueError(f"a sequence exceeds the window of {window} tokens")
        tokens = np.zeros((len(ids), window), np.int32)
        positions = np.full((len(ids), window), -1, np.int32)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = row
            positions[i, : len(row)] = np.arange(len(row))
        logits = model.logits(tokens, positions)
        for i, row in enumerate(ids):
            if not live[i]:
                continue
            nxt = int(np.argmax(logits[i, len(row) - 1]))
            outs[i].append(nxt)
            row.append(nxt)
            live[i] = nxt not in eos_ids and len(outs[i]) < max_new_tokens[i]
    return outs
