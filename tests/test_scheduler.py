"""The scheduler on its own: pure host code driven by a fake step (no JAX, no device arrays).

The fake step stands in for the engine: it checks every chunk the scheduler plans against a
simulated paged KV cache (every earlier position of the sequence must still be in its pages, with the
right token), writes the chunk's tokens there, and samples a token that depends only on the position,
so a request's output is the same however often it was preempted and recomputed. Finished requests
are collected as `Engine._collect` and `OutputStream.add` do (length = max_tokens or max_context),
either right after the step (`lag=0`) or one step late like the engine (`lag=1`).
"""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import textwrap

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer.engine.pages import pages_needed
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.engine.scheduler import Scheduler, SchedulerLimits, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---- helpers -----------------------------------------------------------------------------------
def buckets_for(budget: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `budget`, plus `budget` (as `config.token_buckets`)."""
    return tuple(sorted({min(max(smallest, 2**i), budget) for i in range(budget.bit_length() + 1)} | {budget}))


def make_scheduler(
    data_shards=1,
    slots=4,
    pages=64,
    page_size=4,
    max_context=128,
    prefill_chunk=8,
    buckets=(1, 2, 4, 8),
    prefix_cache=False,
) -> Scheduler:
    return Scheduler(
        SchedulerLimits(
            data_shards=data_shards,
            slots_per_shard=slots,
            pages_per_shard=pages,
            page_size=page_size,
            max_context=max_context,
            prefill_chunk=prefill_chunk,
            buckets=tuple(buckets),
            prefix_cache=prefix_cache,
        ),
        cache_salt=b"model",
    )


def make_seq(rid: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0) -> Sequence:
    prompt = [100 + (7 * i + len(rid)) % 900 for i in range(prompt_len)]
    return Sequence(Request(rid, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=arrival), seed=0)


def fake_token(seq: Sequence) -> int:
    """The token the fake step samples, computed right after `schedule()` (the sample is in flight)."""
    return (seq.total * 7 + len(seq.generated)) % 50 + 3


def token_at(seq: Sequence, pos: int) -> int:
    """The token at position `pos` of `seq`: its prompt, then what the fake step samples there (the
    same value as `fake_token`, written by position, so it also holds for a sample that is in flight)."""
    n = len(seq.request.prompt_ids)
    return seq.request.prompt_ids[pos] if pos < n else ((pos + 1) * 7 + (pos - n)) % 50 + 3


def expected_output(seq: Sequence, max_context: int) -> list[int]:
    n = len(seq.request.prompt_ids)
    count = min(seq.request.params.max_tokens, max_context - n)
    return [token_at(seq, pos) for pos in range(n, n + count)]


def chunks_of(plan) -> list[tuple[str, int, int, int]]:
    return [(c.seq.id, c.start, c.count, c.samples) for c in plan.chunks]


def step_and_accept(sched: Scheduler):
    """One immediate fake step: schedule, then every sampling sequence gets its token (no finishing)."""
    plan = sched.schedule()
    if plan is not None:
        for c in plan.chunks:
            if c.samples:
                sched.accept(c.seq, [fake_token(c.seq)])
    return plan


def check_invariants(sched: Scheduler, finished: tuple = ()) -> None:
    """Pages, slots and the queue agree with each other."""
    lim = sched.limits
    seen: set[int] = set()
    total_held = 0
    for d, (pool, shard) in enumerate(zip(sched.pools, sched.slots)):
        assert len(shard) == lim.slots_per_shard
        running = [s for s in shard if s is not None]
        for slot, seq in enumerate(shard):
            if seq is None:
                continue
            assert (seq.shard, seq.slot) == (d, slot), f"{seq.id} in ({d}, {slot}) says ({seq.shard}, {seq.slot})"
            assert seq.finished is None, f"finished {seq.id} still holds slot ({d}, {slot})"
            assert id(seq) not in seen, f"{seq.id} holds two slots"
            seen.add(id(seq))
            assert len(seq.pages) == pages_needed(seq.num_computed, lim.page_size), (
                seq.id,
                seq.pages,
                seq.num_computed,
            )
            assert 0 <= seq.num_computed <= seq.total <= lim.max_context
        for seq in running:
            assert len(set(seq.pages)) == len(seq.pages), f"{seq.id} holds a page twice: {seq.pages}"
        held = collections.Counter(p for s in running for p in s.pages)  # a shared page is held by several
        total_held += len(held)
        assert all(0 <= p < pool.num_pages for p in held)
        refs = [pool.refcount(p) for p in range(pool.num_pages)]
        assert refs == [held.get(p, 0) for p in range(pool.num_pages)], f"shard {d}: refcounts != live references"
        free = [p for stripe in pool._free for p in stripe]  # no page may be both free (or cached) and held
        cached = [p for stripe in pool._lru for p in stripe]
        assert len(set(free)) == len(free) == pool.free and len(cached) == pool.cached
        assert set(free).isdisjoint(held), f"shard {d}: pages both free and held: {set(free) & set(held)}"
        assert set(cached).isdisjoint(held) and set(cached).isdisjoint(free)
        assert set(free) | set(cached) == {p for p, r in enumerate(refs) if r == 0}
        assert pool.free + pool.used + pool.cached == pool.num_pages
        assert pool.used == len(held)
        # the prefix index: one key per page and one page per key; cached pages indexed, free ones never
        assert {page: key for key, page in pool._page_of.items()} == pool._key_of
        assert all(pool.key_of(p) is not None for p in cached) and all(pool.key_of(p) is None for p in free)
        if not lim.prefix_cache:
            assert not pool._key_of and pool.cached == 0
        for seq in running:  # an indexed page a sequence holds sits where its content key says
            for i, page in enumerate(seq.pages):
                if pool.key_of(page) is not None:
                    assert i < len(seq.page_keys) and seq.page_keys[i] == pool.key_of(page), (seq.id, i, page)
    assert total_held == sched.pages_used
    for seq in sched.waiting:
        assert id(seq) not in seen, f"{seq.id} is both waiting and running"
        seen.add(id(seq))
        assert seq.finished is None and seq.pages == [] and seq.num_computed == 0
    for seq in finished:
        assert id(seq) not in seen, f"finished {seq.id} is still scheduled"


class FakeEngine:
    """Drives a `Scheduler` like `Engine` does, with a fake step on a simulated KV cache."""

    def __init__(self, sched: Scheduler, lag: int = 0, check: bool = True):
        assert lag in (0, 1)
        self.sched, self.lag, self.check = sched, lag, check
        lim = sched.limits
        self.kv = [[[None] * lim.page_size for _ in range(lim.pages_per_shard)] for _ in range(lim.data_shards)]
        self.prev: dict[tuple[int, int], int] = {}  # (shard, slot) -> token sampled there by the last step
        self.pending: list[tuple[Sequence, int]] | None = None
        self.seqs: dict[str, Sequence] = {}
        self.results: dict[str, str] = {}  # id -> finish reason
        self.steps = 0
        self.plans = []

    # facade
    def submit(self, seq: Sequence) -> None:
        assert seq.id not in self.seqs
        self.seqs[seq.id] = seq
        self.sched.add(seq)
        self._check()

    def cancel(self, rid: str, reason: str = "cancelled") -> bool:
        seq = self.sched.find(rid)
        if seq is None:
            return False
        self._finish(seq, reason)
        return True

    def has_work(self) -> bool:
        return self.sched.has_work() or self.pending is not None

    def step(self) -> None:
        count = {id(s): s.preemptions for s in self.seqs.values()}
        plan = self.sched.schedule()
        self._check()
        # a preempted request was the youngest on its shard and is now at the front of the queue
        victims = [s for s in self.seqs.values() if s.preemptions != count[id(s)]]
        assert all(s.preemptions == count[id(s)] + 1 for s in victims)
        assert {id(s) for s in list(self.sched.waiting)[: len(victims)]} == {id(s) for s in victims}
        for victim in victims:
            key = (victim.request.arrival_time, victim.id)
            assert all((s.request.arrival_time, s.id) < key for s in self.sched.slots[victim.shard] if s is not None)
        dispatched = self._run(plan) if plan is not None else None
        if self.lag:
            if plan is None and self.sched.has_work():
                assert self.pending is not None, "idle step with work queued and nothing in flight"
            if self.pending is not None:
                self._collect(self.pending)
            self.pending = dispatched
        else:
            if self.sched.has_work():
                assert plan is not None, "idle step with work queued"
            if dispatched is not None:
                self._collect(dispatched)
        self.steps += 1

    def drain(self, max_steps: int = 100_000) -> None:
        while self.has_work():
            assert self.steps < max_steps, "the scheduler does not make progress"
            self.step()

    # internals
    def _check(self) -> None:
        if self.check:
            check_invariants(self.sched, tuple(s for s in self.seqs.values() if s.finished))

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.sched.finish(seq, reason)
        self.results[seq.id] = reason
        self._check()

    def _collect(self, sampled: list[tuple[Sequence, int]]) -> None:
        """As `Engine._collect` and `OutputStream.add`: accept, then finish by length."""
        lim = self.sched.limits
        for seq, token in sampled:
            self.sched.accept(seq, [token])
            self._check()
            if seq.finished:
                continue
            if (
                len(seq.generated) >= seq.request.params.max_tokens
                or len(seq.request.prompt_ids) + len(seq.generated) >= lim.max_context
            ):
                self._finish(seq, "length")

    def _run(self, plan) -> list[tuple[Sequence, int]]:
        """The fake step: checks the plan, reads and writes the simulated KV cache, samples."""
        lim, sched = self.sched.limits, self.sched
        self.plans.append(plan)
        assert len(plan.shards) == lim.data_shards
        used = [sum(c.count for c in chunks) for chunks in plan.shards]
        assert max(used) <= lim.buckets[-1]
        assert plan.bucket == min(b for b in lim.buckets if b >= max(used))
        sampled, prev = [], {}
        for d, chunks in enumerate(plan.shards):
            assert len({id(c.seq) for c in chunks}) == len(chunks), "a sequence runs twice in one step"
            kinds = []
            for c in chunks:
                seq, page = c.seq, lim.page_size
                assert sched.slots[d][seq.slot] is seq and seq.shard == d
                assert 1 <= c.count <= lim.prefill_chunk
                stop = c.start + c.count
                # samples: 1 exactly when the chunk reaches the end of the tokens the sequence had
                assert seq.num_computed == stop
                if c.samples:
                    assert c.samples == 1 and stop + 1 == seq.total
                else:
                    assert stop < seq.total
                before = seq.total - c.samples  # tokens it had before this step
                kinds.append((before - c.start != 1, seq.request.arrival_time, seq.id))
                assert len(seq.pages) == pages_needed(stop, page)
                # every earlier position is in the cache, in this sequence's pages
                for pos in range(c.start):
                    entry = self.kv[d][seq.pages[pos // page]][pos % page]
                    assert entry == (pos, token_at(seq, pos)), f"{seq.id} lost position {pos}: {entry}"
                # the chunk's tokens: known on the host, the rest from the previous step's sample
                have = seq.known_tokens(c.start, stop)
                assert have == [token_at(seq, p) for p in range(c.start, c.start + len(have))]
                missing = c.count - len(have)
                assert missing <= self.lag, f"{seq.id}: {missing} tokens unknown to the host"
                tokens = have + ([self.prev[(d, seq.slot)]] if missing else [])
                for pos, token in zip(range(c.start, stop), tokens):
                    assert token == token_at(seq, pos), f"{seq.id} runs a wrong token at {pos}"
                    target = seq.pages[pos // page]
                    assert sched.pools[d].refcount(target) == 1, f"{seq.id} writes page {target}, shared"
                    self.kv[d][target][pos % page] = (pos, token)
                if c.samples:
                    token = token_at(seq, stop)
                    if not self.lag:
                        assert token == fake_token(seq)
                    sampled.append((seq, token))
                    prev[(d, seq.slot)] = token
            # decodes first, then prefill chunks; oldest first within each
            assert kinds == sorted(kinds), f"shard {d} chunks out of order: {kinds}"
        self.prev = prev
        return sampled


# ---- the scheduler never needs JAX -----------------------------------------------------------------
def test_scheduler_runs_without_importing_jax():
    code = textwrap.dedent("""
        import sys
        from jaxinfer.engine.requests import Request, SamplingParams
        from jaxinfer.engine.scheduler import Scheduler, SchedulerLimits, Sequence

        sched = Scheduler(SchedulerLimits(data_shards=2, slots_per_shard=2, pages_per_shard=8, page_size=4,
                                          max_context=32, prefill_chunk=8, buckets=(1, 2, 4, 8)))
        seqs = [Sequence(Request(f"r{i}", list(range(1, 3 + 3 * i)), SamplingParams(max_tokens=3 + i),
                                 arrival_time=float(i)), seed=i) for i in range(6)]
        for s in seqs:
            sched.add(s)
        steps = 0
        while sched.has_work():
            plan = sched.schedule()
            assert plan is not None
            for c in plan.chunks:
                if c.samples:
                    sched.accept(c.seq, [(c.seq.total * 7 + len(c.seq.generated)) % 50 + 3])
                    if len(c.seq.generated) >= c.seq.request.params.max_tokens:
                        sched.finish(c.seq, "length")
            steps += 1
            assert steps < 1000
        assert [len(s.generated) for s in seqs] == [3, 4, 5, 6, 7, 8]
        assert sched.pages_used == 0
        assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))
        print("ok", steps)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok ")


# ---- admission -------------------------------------------------------------------------------------
def test_admission_is_fcfs_into_the_least_loaded_shard():
    sched = make_scheduler(data_shards=2, slots=2)
    seqs = {rid: make_seq(rid, 2, arrival=i) for i, rid in enumerate("abcde")}
    for s in seqs.values():
        sched.add(s)
    step_and_accept(sched)
    # ties go to the lower shard; shards fill alternately
    assert {rid: (s.shard, s.slot) for rid, s in seqs.items() if rid != "e"} == {
        "a": (0, 0),
        "b": (1, 0),
        "c": (0, 1),
        "d": (1, 1),
    }
    assert list(sched.waiting) == [seqs["e"]] and seqs["e"].shard == -1
    # a slot frees on shard 1: e goes there, in the freed slot
    sched.finish(seqs["b"], "cancelled")
    step_and_accept(sched)
    assert (seqs["e"].shard, seqs["e"].slot) == (1, 0)
    # shard 0 has two free slots, shard 1 one: the next request goes to shard 0
    for rid in ("a", "c", "d"):
        sched.finish(seqs[rid], "cancelled")
    f = make_seq("f", 2, arrival=5)
    sched.add(f)
    step_and_accept(sched)
    assert (f.shard, f.slot) == (0, 0)
    check_invariants(sched)


def test_admission_keeps_arrival_order():
    sched = make_scheduler(slots=1)
    seqs = [make_seq(rid, 3, arrival=i) for i, rid in enumerate("xyz")]
    for s in seqs:
        sched.add(s)
    order = []
    while sched.has_work():
        plan = step_and_accept(sched)
        order += [c.seq.id for c in plan.chunks if c.seq.id not in order]
        for s in sched.running():
            if len(s.generated) >= 2:
                sched.finish(s, "length")
    assert order == ["x", "y", "z"]


# ---- one step's plan ---------------------------------------------------------------------------------
def test_decodes_go_before_prefill_chunks():
    sched = make_scheduler(slots=4, prefill_chunk=8, buckets=(1, 2, 4, 8))
    a = make_seq("a", 3, max_tokens=10, arrival=1.0)
    sched.add(a)
    assert chunks_of(step_and_accept(sched)) == [("a", 0, 3, 1)]
    # b arrived earlier than a but is still prefilling: a's decode still goes first
    b = make_seq("b", 20, max_tokens=10, arrival=0.5)
    sched.add(b)
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("a", 3, 1, 1), ("b", 0, 7, 0)] and plan.bucket == 8
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("a", 4, 1, 1), ("b", 7, 7, 0)] and plan.bucket == 8
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("a", 5, 1, 1), ("b", 14, 6, 1)] and plan.bucket == 8
    # now both decode, oldest first
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("b", 20, 1, 1), ("a", 6, 1, 1)] and plan.bucket == 2


def test_prefill_is_chunked_and_bounded_by_the_budget():
    sched = make_scheduler(slots=2, prefill_chunk=4, buckets=(1, 2, 4, 6))
    a, b = make_seq("a", 9, arrival=0), make_seq("b", 9, arrival=1)
    sched.add(a)
    sched.add(b)
    steps = []
    for _ in range(4):
        plan = step_and_accept(sched)
        steps.append((chunks_of(plan), plan.bucket))
    assert steps == [
        ([("a", 0, 4, 0), ("b", 0, 2, 0)], 6),  # a gets a whole chunk, b what is left of the budget
        ([("a", 4, 4, 0), ("b", 2, 2, 0)], 6),
        ([("a", 8, 1, 1), ("b", 4, 4, 0)], 6),  # only a's last chunk samples
        ([("a", 9, 1, 1), ("b", 8, 1, 1)], 2),  # a's decode first
    ]


def test_the_budget_below_the_prefill_chunk_limits_chunks():
    sched = make_scheduler(slots=1, prefill_chunk=8, buckets=(1, 2, 4))
    a = make_seq("a", 10)
    sched.add(a)
    assert [chunks_of(step_and_accept(sched)) for _ in range(3)] == [
        [("a", 0, 4, 0)],
        [("a", 4, 4, 0)],
        [("a", 8, 2, 1)],
    ]


def test_bucket_is_the_smallest_that_holds_the_busiest_shard():
    sched = make_scheduler(data_shards=2, slots=2, prefill_chunk=16, buckets=(1, 2, 4, 8, 16))
    a, b = make_seq("a", 3, max_tokens=5), make_seq("b", 5, max_tokens=5)
    sched.add(a)
    sched.add(b)
    plan = step_and_accept(sched)
    assert [[(c.seq.id, c.count) for c in shard] for shard in plan.shards] == [[("a", 3)], [("b", 5)]]
    assert plan.bucket == 8
    plan = step_and_accept(sched)
    assert plan.bucket == 1  # one decode per shard
    c = make_seq("c", 2, max_tokens=5)
    sched.add(c)  # shard 0: a decode + c's 2-token prompt = 3 tokens
    plan = step_and_accept(sched)
    assert [sum(ch.count for ch in shard) for shard in plan.shards] == [3, 1] and plan.bucket == 4
    sched.add(make_seq("d", 16, max_tokens=5))  # shard 1: b decode + 15 of d's prompt = 16 tokens
    plan = step_and_accept(sched)
    assert [sum(ch.count for ch in shard) for shard in plan.shards] == [2, 16] and plan.bucket == 16


def test_samples_only_on_the_chunk_that_reaches_the_known_tokens_end():
    sched = make_scheduler(slots=1, prefill_chunk=3, buckets=(1, 2, 4))
    a = make_seq("a", 7, max_tokens=3)
    sched.add(a)
    samples = []
    for _ in range(5):
        plan = step_and_accept(sched)
        samples += [(c.start, c.count, c.samples) for c in plan.chunks]
    assert samples == [(0, 3, 0), (3, 3, 0), (6, 1, 1), (7, 1, 1), (8, 1, 1)]
    assert a.generated == expected_output(a, 128)


def test_pages_are_allocated_as_the_sequence_grows():
    sched = make_scheduler(slots=2, page_size=4, pages=8, prefill_chunk=8, buckets=(1, 2, 4, 8))
    a = make_seq("a", 9, max_tokens=10)
    sched.add(a)
    trace = []
    for _ in range(6):
        step_and_accept(sched)
        trace.append((a.num_computed, list(a.pages), sched.pages_used))
    assert trace == [
        (8, [0, 1], 2),  # ceil(8 / 4)
        (9, [0, 1, 2], 3),  # the prompt's last token and the first sample's position
        (10, [0, 1, 2], 3),
        (11, [0, 1, 2], 3),
        (12, [0, 1, 2], 3),
        (13, [0, 1, 2, 3], 4),
    ]
    for computed, pages, _ in trace:
        assert len(pages) == pages_needed(computed, 4)
    b = make_seq("b", 5)
    sched.add(b)
    step_and_accept(sched)
    assert b.pages == [4, 5] and sched.pages_used == 6
    sched.finish(a, "cancelled")
    assert sched.pages_used == 2 and sched.pools[0].free == 6
    check_invariants(sched)


# ---- preemption ----------------------------------------------------------------------------------------
def test_preemption_takes_the_youngest_already_planned_and_requeues_it_at_the_front():
    # 3 pages of 4 tokens; a (older, 10-token prompt) and b (younger, 2-token prompt); c waits for a slot
    sched = make_scheduler(slots=2, pages=3, page_size=4, max_context=12, prefill_chunk=4, buckets=(1, 2, 4, 8))
    a = make_seq("a", 10, max_tokens=2, arrival=0.0)
    b = make_seq("b", 2, max_tokens=3, arrival=1.0)
    c = make_seq("c", 1, max_tokens=1, arrival=2.0)
    eng = FakeEngine(sched)
    for s in (a, b, c):
        eng.submit(s)
    eng.step()
    assert chunks_of(eng.plans[-1]) == [("a", 0, 4, 0), ("b", 0, 2, 1)]
    assert (a.pages, b.pages) == ([0], [1])
    eng.step()
    assert chunks_of(eng.plans[-1]) == [("b", 2, 1, 1), ("a", 4, 4, 0)]
    assert (a.pages, b.pages, sched.pools[0].free) == ([0, 2], [1], 0)
    # b's decode is planned first; a's last chunk needs a third page: b, the youngest, is preempted,
    # its chunk dropped from the plan (and its tokens from the budget), and its page goes to a
    eng.step()
    assert chunks_of(eng.plans[-1]) == [("a", 8, 2, 1)] and eng.plans[-1].bucket == 2
    assert a.pages == [0, 2, 1]
    assert (b.pages, b.num_computed, b.inflight, b.preemptions, sched.preemptions) == ([], 0, 0, 1, 1)
    assert sched.slots[0] == [a, None]
    assert list(sched.waiting) == [b, c]  # at the front, before c which was waiting all along
    assert b.generated == expected_output(b, 12)[:2]  # what it sampled before is kept
    # b is admitted again (ahead of c) while a still holds every page, so it preempts itself once more
    eng.step()
    assert chunks_of(eng.plans[-1]) == [("a", 10, 1, 1)]
    assert (b.preemptions, sched.preemptions, list(sched.waiting)) == (2, 2, [b, c])
    assert eng.results == {"a": "length"} and sched.pages_used == 0
    # then b recomputes its prompt and the tokens it had in one chunk, and samples its last token
    # (c's one-token prompt counts as a decode: one token left to compute, so it goes first)
    eng.step()
    assert chunks_of(eng.plans[-1]) == [("c", 0, 1, 1), ("b", 0, 4, 1)]
    for s in (a, b, c):
        assert s.generated == expected_output(s, 12) and s.finished == "length"
    assert (a.preemptions, b.preemptions, c.preemptions, sched.preemptions) == (0, 2, 0, 2)
    assert sched.pages_used == 0 and not eng.has_work()


def test_a_preempted_chunk_gives_its_tokens_back_to_the_budget():
    # page_size 1 (a page per token), 5 pages, budget 3, chunks of at most 2 tokens
    sched = make_scheduler(slots=3, pages=5, page_size=1, max_context=5, prefill_chunk=2, buckets=(1, 2, 3))
    a = make_seq("a", 4, max_tokens=1, arrival=0.0)
    c = make_seq("c", 2, max_tokens=1, arrival=1.0)
    b = make_seq("b", 1, max_tokens=5, arrival=2.0)
    for s in (a, c, b):
        sched.add(s)
    # b's one-token prompt counts as a decode; the budget runs out before c
    assert chunks_of(step_and_accept(sched)) == [("b", 0, 1, 1), ("a", 0, 2, 0)]
    assert sched.pools[0].free == 2
    # b's decode takes a page (1 left); a's last 2 tokens need 2: b is preempted, its chunk dropped and
    # its token returned to the budget, which lets c start
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("a", 2, 2, 1), ("c", 0, 1, 0)] and plan.bucket == 3
    assert (b.preemptions, list(sched.waiting), sched.pools[0].free) == (1, [b], 0)
    check_invariants(sched)


def test_a_preempted_request_waits_until_its_sample_in_flight_is_read_back():
    # a deeper pipeline than the engine's: steps are planned before earlier samples are read back
    sched = make_scheduler(slots=2, pages=4, page_size=1, max_context=4, buckets=(1, 2, 4))
    a = make_seq("a", 1, max_tokens=3, arrival=0.0)
    b = make_seq("b", 1, max_tokens=3, arrival=1.0)
    c = make_seq("c", 1, max_tokens=1, arrival=2.0)
    for s in (a, b):
        sched.add(s)
    assert chunks_of(step_and_accept(sched)) == [("a", 0, 1, 1), ("b", 0, 1, 1)]
    assert chunks_of(sched.schedule()) == [("a", 1, 1, 1), ("b", 1, 1, 1)]  # not read back yet
    in_flight = {s.id: fake_token(s) for s in (a, b)}
    sched.add(c)
    # a's next decode needs a fifth page: b is preempted with its sample still in flight
    assert chunks_of(sched.schedule()) == [("a", 2, 1, 1)]
    assert (list(sched.waiting), b.inflight, b.pages, sched.slots[0]) == ([b, c], 1, [], [a, None])
    # b may not run before its token is on the host, and c may not overtake it
    assert sched.schedule() is None and list(sched.waiting) == [b, c]
    assert (b.preemptions, sched.preemptions, sched.slots[0]) == (1, 1, [a, None])
    sched.accept(b, [in_flight["b"]])
    sched.accept(a, [in_flight["a"]])
    sched.accept(a, [fake_token(a)])
    sched.finish(a, "length")
    # now b recomputes everything it has, the token that was in flight included (c's one-token prompt
    # counts as a decode and goes first)
    plan = sched.schedule()
    assert chunks_of(plan) == [("c", 0, 1, 1), ("b", 0, 3, 1)]
    assert len(b.generated) == 2 and b.generated[-1] == in_flight["b"]
    assert b.known_tokens(0, 3) == b.request.prompt_ids + b.generated
    check_invariants(sched, (a,))


def test_preemption_under_a_tight_page_count_completes_every_request():
    # four requests that each need up to 4 pages share 6 pages on one shard
    sched = make_scheduler(slots=4, pages=6, page_size=4, max_context=16, prefill_chunk=8, buckets=(1, 2, 4, 8))
    seqs = [make_seq(f"r{i}", 5 + i, max_tokens=16 - 5 - i, arrival=float(i)) for i in range(4)]
    eng = FakeEngine(sched)
    for s in seqs:
        eng.submit(s)
    eng.drain()
    assert sched.preemptions > 0
    assert sched.preemptions == sum(s.preemptions for s in seqs)
    assert seqs[0].preemptions == 0  # the oldest is never the youngest
    for s in seqs:
        assert s.generated == expected_output(s, 16) and eng.results[s.id] == "length"
    assert sched.pages_used == 0 and not sched.has_work()


def test_preemption_with_the_engine_s_one_step_late_readback():
    sched = make_scheduler(
        data_shards=2, slots=3, pages=5, page_size=4, max_context=20, prefill_chunk=8, buckets=(1, 2, 4, 8)
    )
    seqs = [make_seq(f"r{i}", 3 + 2 * i, max_tokens=12, arrival=float(i)) for i in range(6)]
    eng = FakeEngine(sched, lag=1)
    for s in seqs:
        eng.submit(s)
    eng.drain()
    assert sched.preemptions > 0
    for s in seqs:
        assert s.generated == expected_output(s, 20) and eng.results[s.id] == "length"
    assert sched.pages_used == 0 and not sched.has_work()


# ---- finishing -------------------------------------------------------------------------------------------
def test_cancel_a_waiting_request():
    sched = make_scheduler(slots=1)
    a, b = make_seq("a", 5), make_seq("b", 5)
    sched.add(a)
    sched.add(b)
    step_and_accept(sched)
    assert sched.find("b") is b and list(sched.waiting) == [b]
    sched.finish(b, "cancelled")
    assert b.finished == "cancelled" and not sched.waiting and sched.find("b") is None
    assert sched.slots[0] == [a] and a.pages == [0, 1]  # a is untouched
    check_invariants(sched, (b,))
    plan = step_and_accept(sched)
    assert [c.seq for c in plan.chunks] == [a]


def test_cancel_a_running_request_frees_its_slot_and_pages():
    sched = make_scheduler(slots=1, pages=4)
    a, b = make_seq("a", 9), make_seq("b", 3)
    sched.add(a)
    sched.add(b)
    step_and_accept(sched)
    assert a.pages == [0, 1] and sched.pages_used == 2 and list(sched.waiting) == [b]
    sched.finish(a, "cancelled")
    assert sched.slots[0] == [None] and a.pages == [] and sched.pages_used == 0
    assert sched.find("a") is None
    check_invariants(sched, (a,))
    plan = step_and_accept(sched)
    assert chunks_of(plan) == [("b", 0, 3, 1)] and b.slot == 0 and b.pages == [0]
    sched.finish(b, "stop")
    assert sched.schedule() is None and not sched.has_work() and sched.pages_used == 0


def test_a_request_at_max_tokens_is_not_scheduled_again():
    sched = make_scheduler(slots=2)
    a = make_seq("a", 3, max_tokens=1)
    sched.add(a)
    assert chunks_of(step_and_accept(sched)) == [("a", 0, 3, 1)]
    assert len(a.generated) == 1
    # not finished yet (its result is collected later), but it has all its tokens: no step for it
    assert sched.schedule() is None
    b = make_seq("b", 2, max_tokens=2)
    sched.add(b)
    assert [c.seq.id for c in step_and_accept(sched).chunks] == ["b"]
    sched.finish(a, "length")
    assert a.pages == [] and sched.slots[0][0] is None


def test_a_sample_in_flight_counts_towards_max_tokens():
    # the engine schedules step n+1 before reading step n's tokens back
    sched = make_scheduler(slots=1)
    a = make_seq("a", 3, max_tokens=2)
    sched.add(a)
    assert chunks_of(sched.schedule()) == [("a", 0, 3, 1)] and a.inflight == 1
    assert chunks_of(sched.schedule()) == [("a", 3, 1, 1)] and a.inflight == 2  # decodes the token in flight
    assert sched.schedule() is None  # two samples in flight = max_tokens
    sched.accept(a, [fake_token(a)])
    sched.accept(a, [fake_token(a)])
    assert a.inflight == 0 and len(a.generated) == 2 and sched.schedule() is None


def test_max_context_ends_a_request():
    sched = make_scheduler(slots=1, max_context=8)
    a = make_seq("a", 6, max_tokens=10)
    eng = FakeEngine(sched)
    eng.submit(a)
    eng.drain()
    assert a.generated == expected_output(a, 8) and len(a.generated) == 2 and eng.results["a"] == "length"
    assert max(c.start + c.count for p in eng.plans for c in p.chunks) == 7  # the last token is never computed


# ---- random workloads ----------------------------------------------------------------------------------
@st.composite
def workloads(draw):
    n = draw(st.integers(2, 8))
    shape = draw(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 60), st.integers(1, 20)), min_size=n, max_size=n))
    shape.sort(key=lambda r: r[0])  # (submit step, prompt tokens, max_tokens)
    # a context just above the longest prompt (so some requests end at max_context), and pages for
    # one request of that context plus at most 2: tight enough that requests get preempted
    max_context = max(prompt for _, prompt, _ in shape) + draw(st.integers(1, 20))
    page_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    pages = pages_needed(max_context, page_size) + draw(st.integers(0, 2))
    slots = draw(st.integers(1, 4))
    prefill_chunk = draw(st.integers(1, 32))
    budget = max(prefill_chunk, slots) + draw(st.integers(0, 8))  # as EngineConfig.validate requires
    limits = SchedulerLimits(
        data_shards=draw(st.integers(1, 2)),
        slots_per_shard=slots,
        pages_per_shard=pages,
        page_size=page_size,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        buckets=buckets_for(budget, draw(st.sampled_from([1, 8]))),
        prefix_cache=draw(st.booleans()),
    )
    requests = [
        (at, make_seq(f"r{i}", prompt, max_tokens, arrival=float(at)))
        for i, (at, prompt, max_tokens) in enumerate(shape)
    ]
    # (step, request index, reason): ended from outside between steps, if still in flight then
    ends = draw(
        st.lists(
            st.tuples(st.integers(0, 20), st.integers(0, n - 1), st.sampled_from(["cancelled", "stop"])), max_size=6
        )
    )
    lag = draw(st.integers(0, 1))
    return limits, requests, ends, lag


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_pages_and_slots_consistent(workload):
    limits, requests, ends, lag = workload
    sched = Scheduler(limits)
    eng = FakeEngine(sched, lag=lag)
    seqs = [s for _, s in requests]
    last_submit = max(at for at, _ in requests)
    for step in range(100_000):
        for at, seq in requests:
            if at == step:
                eng.submit(seq)
        for at, i, reason in ends:
            if at == step and seqs[i].id in eng.seqs:
                eng.cancel(seqs[i].id, reason)
        if step >= last_submit and not eng.has_work():
            break
        assert step < 5000, "the scheduler does not make progress"
        eng.step()
    check_invariants(sched, tuple(seqs))
    # nothing leaks: every page is free or (prefix cache) cached
    assert sched.pages_used == 0 and sched.pools and all(p.free + p.cached == p.num_pages for p in sched.pools)
    stats = sched.prefix.stats
    assert stats.hit_tokens == sum(s.cached_tokens for s in seqs)
    assert all(s.cached_tokens <= len(s.request.prompt_ids) - 1 for s in seqs)  # the last prompt token always ran
    if not limits.prefix_cache:
        assert stats.hit_tokens == stats.lookup_tokens == 0
    assert all(s is None for shard in sched.slots for s in shard) and not sched.waiting
    assert sched.preemptions == sum(s.preemptions for s in seqs)
    for seq in seqs:
        assert seq.finished is not None and eng.results[seq.id] == seq.finished
        assert seq.inflight == 0
        want = expected_output(seq, limits.max_context)
        if seq.finished == "length":
            assert seq.generated == want
        else:  # ended from outside: what it produced so far is still right
            assert seq.generated == want[: len(seq.generated)]
