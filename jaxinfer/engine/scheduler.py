"""The scheduler: slots, KV pages, admission, chunked prefill, preemption and prefix caching. Pure host code (no JAX).

Each data shard has `slots_per_shard` slots and its own `PagePool`. `schedule()` plans one step:
  1. admit waiting requests (first come, first served) into free slots: the shard holding the
     request's longest cached prefix, else the least-loaded one (`PrefixCache.route`);
  2. per shard, one token for every decoding slot, then prompt chunks of prefilling slots (at most
     `prefill_chunk` tokens each, each starting after the cached pages it can adopt) until the
     step's token budget is spent, allocating pages as needed; when a shard runs out of free and
     cached pages its youngest running request is preempted (its pages released, full ones kept in
     the prefix cache, re-queued at the front, recomputed later from its prompt and tokens so far);
  3. the smallest bucket that holds the busiest shard's tokens.
The plan says which tokens of which sequence run and which sequences sample; the engine turns it
into device arrays (`step_inputs`) and reports sampled tokens back through `accept`.

Speculation (`jaxinfer.engine.speculation`): a decoding sequence marked `speculate` runs a window of
its last token and up to K proposals, sampled at every offset, once its previous tokens are read
back (its proposals depend on them). Its tokens are computed as far as the window reaches; `accept`
rolls `num_computed` back to the accepted ones, so the rejected tail's K/V is simply overwritten.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from jaxinfer.engine.pages import OutOfPages, PagePool, pages_needed
from jaxinfer.engine.prefix_cache import PrefixCache
from jaxinfer.engine.requests import Request

log = logging.getLogger(__name__)


class Sequence:
    """A request in flight: its tokens, where its KV lives, and how far it has got."""

    def __init__(self, request: Request, seed: int):
        self.request = request
        self.prompt_len = len(request.prompt_ids)  # read several times per sequence per step
        self.seed = seed
        self.generated: list[int] = []
        self.inflight = 0  # tokens sampled on device, not yet read back (at most 2: steps n and n+1)
        self.num_computed = 0  # tokens whose K/V are in the cache (or being written by a dispatched step)
        self.pages: list[int] = []
        self.page_keys: list[bytes] = []  # content keys of its full pages so far (prefix cache)
        self.registered = 0  # leading pages offered to the prefix cache's index
        self.cached_tokens = 0  # prompt tokens served from the prefix cache rather than computed
        self.prompt_reached = 0  # prompt positions computed or adopted so far (high-water mark)
        self.looked_up = False  # counted in the prefix cache's lookups
        self.shard = self.slot = -1
        self.preemptions = 0
        self.finished: str | None = None
        self.speculate = False  # runs verify windows, waiting for each step's tokens (the policy decides)
        self.verifying = False  # a verify window of it is in flight: nothing runs until it is read back
        self.draft_proposals: list[int] = []  # the draft's proposals for its next window, read back
        self.proposed = self.accepted = 0  # proposals verified for it so far, and how many were accepted
        self.draft_valid = 0  # positions whose draft-model K/V is in the draft cache (--speculative draft)
        self.history = (0, 0)  # (proposals tried one by one, accepted), verified or scored: the policy's estimate
        self.shadow = None  # n-gram: (position, proposals) to score against the tokens that come there
        self.ngram = None  # n-gram: its `NgramIndex`, built on first use

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def known(self) -> int:
        """Tokens the host has: prompt and generated (read back)."""
        return self.prompt_len + len(self.generated)

    @property
    def total(self) -> int:
        """Tokens the sequence has: prompt, generated, and the one in flight."""
        return self.known + self.inflight

    def known_tokens(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) that the host has (prompt, then generated)."""
        n = self.prompt_len
        head = list(self.request.prompt_ids[start : min(stop, n)])
        return head + self.generated[max(start - n, 0) : max(stop - n, 0)] if stop > n else head


@dataclasses.dataclass(frozen=True)
class Chunk:
    """`count` tokens of `seq` from position `start` run in this step; `samples` tokens are sampled
    (0 for a prompt chunk that does not reach the prompt's end; 1 after its last token; a verify
    window's last token and its `proposals`, the last `len(proposals)` of its tokens, sample 1 + K).
    `propose`: the draft proposes the sequence's next window in this step."""

    seq: Sequence
    start: int
    count: int
    samples: int
    proposals: tuple[int, ...] = ()
    propose: bool = False

    def without_proposals(self) -> Chunk:
        """The plain decode this window would be (its step's verify executable is not ready yet)."""
        k = len(self.proposals)
        return dataclasses.replace(self, count=self.count - k, samples=self.samples - k, proposals=())


@dataclasses.dataclass(frozen=True)
class StepPlan:
    shards: tuple[tuple[Chunk, ...], ...]  # per data shard, in scheduling order
    bucket: int  # tokens per shard the step is padded to
    follow: bool = False  # the draft model runs over the step's tokens (keeps its cache in step)

    @property
    def chunks(self) -> list[Chunk]:
        return [c for shard in self.shards for c in shard]

    @property
    def verifies(self) -> bool:
        """Some chunk is a verify window: the step needs the bucket's verify variant."""
        return any(c.proposals for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
    data_shards: int
    slots_per_shard: int
    pages_per_shard: int
    page_size: int
    max_context: int
    prefill_chunk: int
    buckets: tuple[int, ...]
    prefix_cache: bool = False
    draft_tokens: int = 0  # K when a draft model proposes: pages are allocated for its K positions ahead
    sequence_shards: int = 1  # a data shard's pages are dealt round-robin over them (`PagePool` stripes)

    @property
    def route_imbalance(self) -> int:
        """How many more running requests than the least-loaded shard a prefix hit may route to."""
        return max(1, self.slots_per_shard // 2)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, cache_salt: bytes = b"", proposer=None):
        """`proposer(seq, limit) -> list[int]`: up to `limit` proposals for a speculating sequence's window."""
        self.limits = limits
        self.proposer = proposer
        self.pools = [PagePool(limits.pages_per_shard, limits.sequence_shards) for _ in range(limits.data_shards)]
        self.prefix = PrefixCache(self.pools, limits.page_size, cache_salt, limits.prefix_cache)
        self.slots: list[list[Sequence | None]] = [[None] * limits.slots_per_shard for _ in range(limits.data_shards)]
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.preemptions = 0
        self.buckets = limits.buckets  # the buckets steps may use now (fewer while larger ones still compile)
        self.verify_buckets: set[int] = set()  # buckets whose verify executable is ready (speculation)
        self.admitted: list[Sequence] = []  # given a slot since the engine last took them (`take_admitted`)

    # ---- queries ---------------------------------------------------------------------------
    def running(self) -> list[Sequence]:
        return [s for shard in self.slots for s in shard if s is not None]

    def find(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting) + self.running():
            if seq.id == request_id and not seq.finished:
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for shard in self.slots for s in shard)

    @property
    def pages_used(self) -> int:
        return sum(p.used for p in self.pools)

    @property
    def pages_cached(self) -> int:
        return sum(p.cached for p in self.pools)

    @property
    def pages_total(self) -> int:
        return sum(p.num_pages for p in self.pools)

    def take_admitted(self) -> list[Sequence]:
        """The sequences given a slot since the last call (a preempted one again when readmitted)."""
        admitted, self.admitted = self.admitted, []
        return [seq for seq in admitted if self.slots[seq.shard][seq.slot] is seq]

    # ---- changes -----------------------------------------------------------------------------
    def use_buckets(self, buckets: tuple[int, ...]) -> None:
        """Plans steps within `buckets` (a non-empty subset of the limits' buckets) from now on: a prompt is
        split into smaller chunks, and decodes beyond the largest bucket wait, until more are ready."""
        if not buckets or not set(buckets) <= set(self.limits.buckets):
            raise ValueError(f"buckets {buckets} must be a non-empty subset of {self.limits.buckets}")
        self.buckets = tuple(sorted(buckets))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq`: out of the queue, or its slot and pages free for the next step."""
        seq.finished = reason
        if seq.shard >= 0 and self.slots[seq.shard][seq.slot] is seq:  # running, so not queued
            self.slots[seq.shard][seq.slot] = None
            self.pools[seq.shard].release(seq.pages)
            seq.pages, seq.registered = [], 0
        elif seq in self.waiting:  # a scan of the queue only for what may be in it (it can be long)
            self.waiting.remove(seq)

    def accept(self, seq: Sequence, tokens: list[int], sampled: int | None = None) -> None:
        """Tokens sampled for `seq` by a step, now read back on the host: `sampled` were in flight (a
        verify window's K + 1), of which `tokens` are kept; the window's rejected tail is rolled back."""
        seq.inflight -= len(tokens) if sampled is None else sampled
        seq.verifying = False
        seq.generated.extend(tokens)
        if not seq.inflight:  # the last known token's K/V is computed next step; nothing after it exists
            seq.num_computed = min(seq.num_computed, seq.known - 1)
            seq.draft_valid = min(seq.draft_valid, seq.num_computed)
        if not seq.finished:
            self.prefix.register(seq)  # a page filled by decoding is indexed once its last token is known

    def schedule(self, follow: bool = False) -> StepPlan | None:
        """Plans the next step and marks its tokens computed and its samples in flight; None if idle.
        `follow`: the draft model runs over the step's tokens too."""
        self._admit()
        budget = self.buckets[-1]
        shards = tuple(tuple(self._schedule_shard(d, budget)) for d in range(self.limits.data_shards))
        if not any(shards):
            return None
        bucket = self._bucket(shards)
        if bucket not in self.verify_buckets and any(c.proposals for chunks in shards for c in chunks):
            shards = tuple(tuple(c.without_proposals() if c.proposals else c for c in chunks) for chunks in shards)
            bucket = self._bucket(shards)
        plan = StepPlan(shards, bucket, follow)
        for chunk in plan.chunks:
            chunk.seq.verifying = bool(chunk.proposals)
            if follow and chunk.seq.draft_valid >= chunk.start:
                chunk.seq.draft_valid = chunk.start + chunk.count
            chunk.seq.num_computed = chunk.start + chunk.count
            chunk.seq.inflight += chunk.samples
            self.prefix.computed(chunk.seq, chunk.start, chunk.count)
        return plan

    # ---- internals ---------------------------------------------------------------------------
    def _bucket(self, shards) -> int:
        used = max(sum(c.count for c in chunks) for chunks in shards)
        return next(b for b in self.buckets if b >= used)

    def _admit(self) -> None:
        load = [sum(s is not None for s in shard) for shard in self.slots]  # running requests per shard
        while self.waiting and not self.waiting[0].inflight:  # a preempted request's last token may be in flight
            shard = self.prefix.route(self.waiting[0], load, self.limits.slots_per_shard, self.limits.route_imbalance)
            if shard is None:
                return
            seq = self.waiting.popleft()
            seq.shard = shard
            seq.slot = self.slots[seq.shard].index(None)
            self.slots[seq.shard][seq.slot] = seq
            load[shard] += 1
            self.admitted.append(seq)

    def _preempt_youngest(self, shard: int) -> Sequence:
        running = [s for s in self.slots[shard] if s is not None]
        victim = max(running, key=lambda s: (s.request.arrival_time, s.id))
        self.pools[shard].release(victim.pages)  # its full, indexed pages stay in the prefix cache
        victim.pages, victim.num_computed, victim.registered, victim.draft_valid = [], 0, 0, 0
        self.slots[shard][victim.slot] = None
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        log.info("preempted request %s (KV pages exhausted on data shard %d); it will be recomputed", victim.id, shard)
        return victim

    def _proposals(self, seq: Sequence, budget: int) -> list[int]:
        """Up to K proposals, as many as the step's budget, max_tokens and the context leave room for."""
        room = min(
            budget,
            seq.request.params.max_tokens - len(seq.generated) - seq.inflight - 1,
            self.limits.max_context - seq.total - 1,
        )
        return self.proposer(seq, room) if room > 0 and self.proposer is not None else []

    def _done_by_length(self, seq: Sequence, total: int) -> bool:
        produced = len(seq.generated) + seq.inflight
        return produced >= seq.request.params.max_tokens or total >= self.limits.max_context

    def _schedule_shard(self, shard: int, budget: int) -> list[Chunk]:
        """Decodes first, then prefill chunks, oldest request first within each."""
        pool, page = self.pools[shard], self.limits.page_size
        running = sorted((s for s in self.slots[shard] if s is not None), key=lambda s: (s.request.arrival_time, s.id))
        for seq in running:
            if seq.total - seq.num_computed > 1:
                synced = seq.draft_valid >= seq.num_computed
                self.prefix.adopt(seq)  # before sorting decodes from prefills: it may leave one token to run
                if synced:  # adopted pages are taken to hold the draft's K/V too (steps that wrote them followed)
                    seq.draft_valid = seq.num_computed
        decodes, prefills = [], []
        for seq in running:
            left = seq.total - seq.num_computed
            if left >= 1:
                (decodes if left == 1 else prefills).append(seq)
        plan: list[Chunk] = []
        pending: set[bytes] = set()  # content keys of the pages this step's prompt chunks fill
        for seq in decodes + prefills:
            if self.slots[shard][seq.slot] is not seq or budget == 0:
                continue
            total = seq.total  # fixed while the shard is planned (a preempted one leaves its slot)
            decoding = total - seq.num_computed == 1
            if decoding and self._done_by_length(seq, total):
                continue  # finished by length; collected when its last token is read back
            if decoding and seq.inflight and (seq.speculate or seq.verifying):
                continue  # its next tokens (or where they start) are still on their way back
            if not decoding and self.prefix.waits_for(seq, pending):
                continue
            count = min(total - seq.num_computed, budget, self.limits.prefill_chunk)
            proposals = tuple(self._proposals(seq, budget - 1)) if decoding and seq.speculate else ()
            count += len(proposals)
            reach = seq.num_computed + count
            samples = int(reach == total + len(proposals)) + len(proposals)
            propose = bool(samples and seq.speculate and self.limits.draft_tokens)
            if propose:  # the draft writes its K/V at the K positions after the window's last sample
                reach = min(reach + self.limits.draft_tokens, self.limits.max_context)
            while True:
                need = pages_needed(reach, page) - len(seq.pages)
                try:
                    seq.pages += pool.allocate(max(need, 0), first=len(seq.pages))
                    break
                except OutOfPages:
                    victim = self._preempt_youngest(shard)
                    budget += sum(c.count for c in plan if c.seq is victim)
                    plan = [c for c in plan if c.seq is not victim]
                    if victim is seq:
                        break
            if self.slots[shard][seq.slot] is not seq:
                continue
            plan.append(Chunk(seq, seq.num_computed, count, samples, proposals, propose))
            self.prefix.computing(seq, seq.num_computed, count, pending)
            budget -= count
        return plan
