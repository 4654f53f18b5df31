"""Prefix caching: requests reuse the KV pages of token prefixes computed before. Pure host code.

The scheduler calls this at three points:
  admission   `route` picks the data shard holding the longest cached prefix of the request;
  planning    before each prompt chunk, `adopt` takes the cached pages that continue the sequence
              (`num_computed` jumps past them), capped so that the last known token always runs
              and the first sampled token comes from a fresh step;
  after       `register` indexes the sequence's newly full pages once their K/V is written by a
              dispatched step and their tokens are known on the host (prompt pages when planned,
              pages filled by decoding when their last token is read back).
Adoption is retried before every chunk, not only at admission, and a request whose next page another
request computes in the same step waits a step for it (`waits_for`), so requests that arrive together
with the same prompt take turns: each adopts what the others computed and computes only the rest.
The pages and their reference counts live in each shard's `PagePool`.
"""

from __future__ import annotations

import dataclasses
import hashlib

from jaxinfer.engine.pages import PagePool, chain_keys


@dataclasses.dataclass
class PrefixStats:
    """Cumulative figures over all shards."""

    lookup_tokens: int = 0  # prompt tokens of admitted requests (each request counted once)
    hit_tokens: int = 0  # of those, tokens served from the cache instead of computed
    prompt_tokens_computed: int = 0  # prompt tokens that ran through the model (recomputes included)


def model_salt(*identity) -> bytes:
    """The first link of every hash chain: what makes K/V differ for equal tokens (the model, later an adapter)."""
    return hashlib.blake2b(repr(identity).encode(), digest_size=16).digest()


class PrefixCache:
    def __init__(self, pools: list[PagePool], page_size: int, salt: bytes, enabled: bool):
        self.pools, self.page_size, self.salt, self.enabled = pools, page_size, salt, enabled
        self.stats = PrefixStats()

    @property
    def evictions(self) -> int:
        return sum(p.evictions for p in self.pools)

    def keys(self, seq, pages: int) -> list[bytes]:
        """The content keys of `seq`'s first `pages` pages (their tokens must be known on the host)."""
        have = len(seq.page_keys)
        if pages > have:
            parent = seq.page_keys[-1] if have else self.salt
            tokens = seq.known_tokens(have * self.page_size, pages * self.page_size)
            seq.page_keys += chain_keys(parent, tokens, self.page_size)
        return seq.page_keys[:pages]

    def _reusable_pages(self, seq) -> int:
        """Full pages before the page holding the last known token (that token must run)."""
        return (seq.known - 1) // self.page_size

    def cached_pages(self, seq, shard: int) -> int:
        """How many of `seq`'s leading pages shard `shard` holds (no references taken)."""
        if not self.enabled:
            return 0
        return len(self.pools[shard].lookup(self.keys(seq, self._reusable_pages(seq))))

    def route(self, seq, load: list[int], slots: int, imbalance: int) -> int | None:
        """The data shard for a new request, given each shard's running requests (`load`) and `slots` per
        shard; None to keep it waiting. It goes to the shard holding its longest cached prefix unless
        that shard would run more than `imbalance` requests above the least-loaded open shard; ties and
        misses go to the least-loaded (lowest index first). When the best shard is full, the request
        waits for a slot there only while every shard is within `imbalance` of full anyway."""
        if self.enabled and not seq.looked_up:
            seq.looked_up = True
            self.stats.lookup_tokens += len(seq.request.prompt_ids)
        shards = range(len(load))
        open_shards = [d for d in shards if load[d] < slots]
        if not open_shards:
            return None
        least = min(open_shards, key=lambda d: (load[d], d))
        hits = [self.cached_pages(seq, d) for d in shards]
        best = max(shards, key=lambda d: (hits[d], -load[d], -d))
        best_open = max(open_shards, key=lambda d: (hits[d], -load[d], -d))
        if best not in open_shards and hits[best] > hits[best_open] and load[best] <= load[least] + imbalance:
            return None
        if hits[best_open] > 0 and load[best_open] <= load[least] + imbalance:
            return best_open
        return least

    def adopt(self, seq) -> None:
        """Extends `seq` with the cached pages that continue it, when it stands at a page boundary."""
        page = self.page_size
        start = len(seq.pages)
        if not self._adopts(seq) or seq.num_computed != start * page:
            return
        keys = self.keys(seq, self._reusable_pages(seq))[start:]
        pool = self.pools[seq.shard]
        hit = pool.lookup(keys)
        if not hit:
            return
        pool.share(hit)
        seq.pages += hit
        seq.num_computed = len(seq.pages) * page
        fresh = _reach(seq, seq.num_computed)
        seq.cached_tokens += fresh
        self.stats.hit_tokens += fresh

    def _adopts(self, seq) -> bool:
        """Requests for prompt logprobs compute their whole prompt (as in vLLM): cached pages carry no logits."""
        return self.enabled and seq.request.params.prompt_logprobs is None

    def computing(self, seq, start: int, count: int, pending: set[bytes]) -> None:
        """A prompt chunk of `seq` was planned for this step: the keys of the pages it fills go into `pending`."""
        if self.enabled and start + count <= seq.known:
            pending.update(self.keys(seq, (start + count) // self.page_size)[start // self.page_size :])

    def waits_for(self, seq, pending: set[bytes]) -> bool:
        """True when `seq`'s next page is being computed by another request in this step: it adopts it
        next step rather than computing the same tokens twice."""
        page = self.page_size
        if not self._adopts(seq) or not pending or seq.num_computed % page:
            return False
        keys = self.keys(seq, self._reusable_pages(seq))
        return seq.num_computed // page < len(keys) and keys[seq.num_computed // page] in pending

    def computed(self, seq, start: int, count: int) -> None:
        """A chunk of `seq` from `start` was planned: counts its prompt tokens and indexes full pages."""
        self.stats.prompt_tokens_computed += max(min(start + count, len(seq.request.prompt_ids)) - start, 0)
        _reach(seq, start + count)
        self.register(seq)

    def register(self, seq) -> None:
        """Indexes `seq`'s full pages whose K/V is computed and whose tokens the host knows."""
        if not self.enabled or not seq.pages:
            return
        full = min(seq.num_computed, seq.known) // self.page_size
        if full <= seq.registered:
            return
        keys = self.keys(seq, full)
        pool = self.pools[seq.shard]
        for i in range(seq.registered, full):
            pool.register(seq.pages[i], keys[i])
        seq.registered = full


def _reach(seq, position: int) -> int:
    """Moves `seq`'s prompt high-water mark to `position` (computed or adopted up to there); returns how
    many prompt positions that adds, which are the ones not counted before."""
    reached = min(position, len(seq.request.prompt_ids))
    fresh = max(reached - seq.prompt_reached, 0)
    seq.prompt_reached = max(seq.prompt_reached, reached)
    return fresh
