"""The KV pages of one data shard: reference counts, a free list, and the prefix cache's index. Pure host code.

Every page is in exactly one of three states:
  free    count 0, on the free list, holding nothing anyone will read;
  in use  count >= 1: referenced by that many sequences (shared pages are prefix-cache hits);
  cached  count 0, not on the free list: a full page whose content key is in the index, kept
          resident for later requests and evicted least-recently-used only when an allocation
          finds the free list short.
A full page's key is a hash chain over the token ids of its page and every page before it, seeded
with the model's identity (`chain_keys`), so equal keys mean equal K/V. Page ids are local to the
data shard (0 .. num_pages-1).

Sequence parallelism splits a data shard's pages into `stripes` equal blocks, one per sequence shard
(block s holds ids s * per_stripe .. (s+1) * per_stripe - 1 and lives on sequence shard s). Page j of a
sequence (its j-th page, tokens j * page_size ..) comes from stripe j % stripes, so a request's pages
are dealt round-robin over the sequence shards; a prefix-cache hit keeps that, as page j's content key
is only ever looked up for page j. With one stripe (no sequence axis) every page is alike.
"""

from __future__ import annotations

import array
import collections
import hashlib


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def chain_keys(parent: bytes, tokens: list[int], page_size: int) -> list[bytes]:
    """The content keys of the full pages of `tokens`, continuing the chain after the key `parent`
    (the model's salt for a sequence's first page). 16-byte BLAKE2b: collisions are not a concern."""
    keys = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        data = array.array("i", tokens[start : start + page_size]).tobytes()
        parent = hashlib.blake2b(parent + data, digest_size=16).digest()
        keys.append(parent)
    return keys


class OutOfPages(Exception):
    """Raised by `PagePool.allocate` when the shard has too few free and cached pages."""


class PagePool:
    def __init__(self, num_pages: int, stripes: int = 1):
        if num_pages % stripes:
            raise ValueError(f"num_pages {num_pages} must be a multiple of stripes {stripes}")
        self.num_pages, self.stripes = num_pages, stripes
        self.per_stripe = num_pages // stripes
        # per stripe, its free pages (pop() hands out low ids first) and its cached pages, oldest first
        self._free = [list(range((s + 1) * self.per_stripe - 1, s * self.per_stripe - 1, -1)) for s in range(stripes)]
        self._lru: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(stripes)]
        self._refs = [0] * num_pages
        self._key_of: dict[int, bytes] = {}  # page -> content key, for every indexed page (in use or cached)
        self._page_of: dict[bytes, int] = {}  # content key -> page
        self.evictions = 0

    @property
    def free(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def cached(self) -> int:
        """Pages no sequence uses that the prefix cache keeps resident."""
        return sum(len(lru) for lru in self._lru)

    @property
    def used(self) -> int:
        return self.num_pages - self.free - self.cached

    def stripe_of(self, page: int) -> int:
        return page // self.per_stripe

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def key_of(self, page: int) -> bytes | None:
        return self._key_of.get(page)

    def allocate(self, count: int, first: int = 0) -> list[int]:
        """Pages `first` .. `first + count - 1` of a sequence (page j from stripe j % stripes), each with one
        reference: free ones first, then cached ones evicted least recently used first; OutOfPages (taking
        nothing) when a stripe has too few free and cached pages."""
        need = [len(range((s - first) % self.stripes, count, self.stripes)) for s in range(self.stripes)]
        for s, n in enumerate(need):
            if n > len(self._free[s]) + len(self._lru[s]):
                where = f" of stripe {s}" if self.stripes > 1 else ""
                raise OutOfPages(f"need {n} pages{where}, {len(self._free[s])} free and {len(self._lru[s])} cached")
        for s, n in enumerate(need):
            free, lru = self._free[s], self._lru[s]
            while len(free) < n:
                page, _ = lru.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
                free.append(page)
                self.evictions += 1
        pages = [self._free[(first + i) % self.stripes].pop() for i in range(count)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each of `pages`, which are in use or cached (a cached page is in use again)."""
        for p in pages:
            if self._refs[p] == 0:
                lru = self._lru[self.stripe_of(p)]
                if p not in lru:
                    raise AssertionError(f"page {p} is free; only pages in use or cached can be shared")
                del lru[p]
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drops one reference to each of `pages`. A page whose count reaches zero is cached when it is
        indexed, else free. Pages are released last first, so a sequence's tail is evicted before its head."""
        for p in reversed(pages):
            if self._refs[p] < 1:
                raise AssertionError(f"page {p} released more often than referenced")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._key_of:
                    self._lru[self.stripe_of(p)][p] = None
                else:
                    self._free[self.stripe_of(p)].append(p)

    def register(self, page: int, key: bytes) -> bool:
        """Indexes `page` (in use, full, its K/V written or being written by a dispatched step) under its
        content key. False when another page already holds that key: this one stays private."""
        if self._refs[page] < 1:
            raise AssertionError(f"page {page} is not in use; only a sequence's own pages can be indexed")
        held = self._page_of.get(key)
        if held is not None:
            return held == page
        if page in self._key_of:
            raise AssertionError(f"page {page} is already indexed under another key")
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest prefix of `keys` that the index holds (no references taken)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages
