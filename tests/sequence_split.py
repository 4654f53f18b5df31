"""Test helper: a ragged paged-attention case (`tests.test_ragged_paged_attention.make_case`'s args) dealt
over S sequence shards as the engine deals pages (`jaxinfer.engine.pages`): page j of each sequence goes to
shard j % S. Each shard gets its own poisoned cache holding only its pages (NaN for float caches; bytes
0xff for int8, whose scales then read as NaN) and a local page table whose column k is page k * S + s of
the sequence (unused columns point at a poisoned page)."""

import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention.quantized import page_size_of


def split_over_sequence_shards(args, shards: int):
    """-> [args of shard s: its own kv_pages and page_indices, the other inputs shared] for s in 0 .. S-1."""
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = args
    page = page_size_of(kv_pages)
    pages, table, lens = np.asarray(kv_pages), np.asarray(page_indices), np.asarray(kv_lens)
    n = int(np.asarray(num_seqs)[0])
    poison = -1 if pages.dtype == np.int8 else np.nan
    out = []
    for s in range(shards):
        mine: dict[int, int] = {}  # global page -> local page
        local_table = np.zeros((table.shape[0], -(-table.shape[1] // shards)), np.int32)
        for i in range(n):
            for j in range(s, -(-int(lens[i]) // page), shards):
                local_table[i, j // shards] = mine.setdefault(int(table[i, j]), len(mine))
        poisoned = len(mine)
        for i in range(table.shape[0]):
            used = len(range(s, -(-int(lens[i]) // page), shards)) if i < n else 0
            local_table[i, used:] = poisoned
        local = np.full((poisoned + 3,) + pages.shape[1:], poison, np.float32).astype(pages.dtype)
        for g, loc in mine.items():
            local[loc] = pages[g]
        out.append((q, jnp.asarray(local), kv_lens, jnp.asarray(local_table), cu_q_lens, num_seqs))
    return out
