"""The prefix cache on its own: page states, hash chains, adoption, routing, eviction (pure host, no JAX).

Random workloads with the cache on (admit / extend / finish / preempt / cancel / evict) are checked
by `test_scheduler.test_random_workloads_keep_pages_and_slots_consistent`; real-model exactness by
`test_prefix_cache_engine`.
"""

from __future__ import annotations

import pytest

from jaxinfer.engine.pages import OutOfPages, PagePool, chain_keys
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.engine.scheduler import Scheduler, Sequence
from tests.test_scheduler import FakeEngine, check_invariants, expected_output, make_scheduler

PROMPT = [100 + (13 * i) % 400 for i in range(64)]


def make(data_shards=1, slots=4, pages=64, page_size=4, prefill_chunk=8, budget=8, cache=True) -> Scheduler:
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32) if b < budget) + (budget,)
    return make_scheduler(data_shards, slots, pages, page_size, 128, prefill_chunk, buckets, prefix_cache=cache)


def seq(rid: str, prompt: list[int], max_tokens: int = 3, arrival: float = 0.0) -> Sequence:
    return Sequence(Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), arrival_time=arrival), seed=0)


def run(sched: Scheduler, *seqs: Sequence) -> FakeEngine:
    """Runs `seqs` to the end on the scheduler's fake engine (one per scheduler: it holds the simulated KV)."""
    if not hasattr(sched, "fake"):
        sched.fake = FakeEngine(sched)
    eng = sched.fake
    for s in seqs:
        eng.submit(s)
    eng.drain()
    for s in seqs:
        assert s.generated == expected_output(s, sched.limits.max_context)
    return eng


# ---- pages and keys ----------------------------------------------------------------------------------
def test_keys_chain_over_every_earlier_page_and_the_salt():
    a = chain_keys(b"m", [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full pages only
    assert chain_keys(b"m", [1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert chain_keys(b"other model", [1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]
    assert chain_keys(b"m", [0, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]  # same page, different history
    assert chain_keys(a[0], [5, 6, 7, 8], 4) == a[1:]  # continuing the chain from the last key


def test_pages_are_free_in_use_or_cached():
    pool = PagePool(4)
    a = pool.allocate(2)
    assert (pool.free, pool.used, pool.cached) == (2, 2, 0)
    assert pool.register(a[0], b"k0") and pool.register(a[0], b"k0")  # idempotent for the same page
    b = pool.allocate(1)
    assert not pool.register(b[0], b"k0")  # an equal page is indexed already: this one stays private
    pool.release(a + b)
    assert (pool.free, pool.used, pool.cached) == (3, 0, 1)  # the indexed page stays resident
    assert pool.lookup([b"k0", b"k1"]) == [a[0]]
    pool.share([a[0]])  # a cached page is in use again
    assert (pool.used, pool.cached, pool.refcount(a[0])) == (1, 0, 1)
    with pytest.raises(AssertionError):
        pool.share([b[0]])  # free pages hold nothing to share
    pool.release([a[0]])
    with pytest.raises(AssertionError):
        pool.release([a[0]])


def test_allocation_evicts_least_recently_used_cached_pages_tail_first():
    pool = PagePool(6)
    first, second = pool.allocate(3), pool.allocate(3)
    for i, p in enumerate(first + second):
        pool.register(p, bytes([i]))
    pool.release(first)  # released last page first: its tail is the oldest
    pool.release(second)
    assert pool.cached == 6 and pool.free == 0
    got = pool.allocate(2)
    assert sorted(got) == sorted(first[1:]) and pool.evictions == 2
    assert pool.lookup([bytes([0]), bytes([1])]) == [first[0]]  # the head survived, the chain stops after it
    with pytest.raises(OutOfPages):
        pool.allocate(5)  # 4 cached: takes nothing
    assert pool.cached == 4 and pool.evictions == 2


# ---- adoption ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len,cached", [(10, 8), (12, 8), (13, 12), (4, 0), (5, 4)])
def test_a_repeated_prompt_adopts_whole_pages_but_its_last_token_always_runs(prompt_len, cached):
    sched = make()
    first = seq("a", PROMPT[:prompt_len])
    run(sched, first)
    again = seq("b", PROMPT[:prompt_len], arrival=1.0)
    eng = run(sched, again)
    assert again.cached_tokens == cached and first.cached_tokens == 0
    starts = [c.start for p in eng.plans for c in p.chunks if c.seq is again]
    assert starts[0] == cached  # computing starts right after the cached pages
    assert sched.prefix.stats.prompt_tokens_computed == prompt_len + prompt_len - cached


def test_requests_arriving_together_take_turns_instead_of_repeating_the_prompt():
    sched = make(page_size=4, prefill_chunk=8, budget=8)
    seqs = [seq(f"r{i}", PROMPT[:40], arrival=float(i)) for i in range(4)]
    run(sched, *seqs)
    # the first computes all 40; each other adopts 9 pages and computes the last page's 4 tokens
    assert [s.cached_tokens for s in seqs] == [0, 36, 36, 36]
    assert sched.prefix.stats.prompt_tokens_computed == 40 + 3 * 4
    assert sched.prefix.stats.lookup_tokens == 160 and sched.prefix.stats.hit_tokens == 108


def test_a_second_turn_reuses_the_pages_the_first_turn_generated():
    sched = make(page_size=4)
    turn1 = seq("t1", PROMPT[:10], max_tokens=9)
    run(sched, turn1)
    # positions 0..17 were computed (the last sampled token never runs): 4 full pages, 2 of them generated
    turn2 = seq("t2", PROMPT[:10] + turn1.generated + [7, 8, 9], arrival=1.0)
    run(sched, turn2)
    assert turn2.cached_tokens == 16


def test_without_the_cache_nothing_is_shared_or_kept():
    sched = make(cache=False)
    run(sched, seq("a", PROMPT[:20]), seq("b", PROMPT[:20], arrival=1.0))
    assert sched.pages_cached == 0 and sched.prefix.stats.hit_tokens == 0
    assert sched.prefix.stats.prompt_tokens_computed == 40


def test_a_preempted_request_finds_its_own_pages_in_the_cache():
    # 8 pages of 4 tokens: two 14-token prompts growing to 26 tokens cannot both stay resident
    sched = make(pages=8, page_size=4, slots=2, prefill_chunk=16, budget=16)
    old = seq("old", PROMPT[:14], max_tokens=12, arrival=0.0)
    young = seq("young", PROMPT[20:34], max_tokens=12, arrival=1.0)
    eng = run(sched, old, young)
    assert young.preemptions >= 1 and sched.preemptions == young.preemptions
    assert young.cached_tokens == 0  # it computed those tokens itself before it was preempted
    recomputed = sched.prefix.stats.prompt_tokens_computed - 28
    assert 0 < recomputed < 14 * young.preemptions  # the recompute started after its cached pages
    check_invariants(sched, (old, young))
    assert eng.results == {"old": "length", "young": "length"}


# ---- routing over data shards ---------------------------------------------------------------------
def test_a_request_goes_to_the_shard_holding_its_prefix_within_the_imbalance_guard():
    sched = make(data_shards=2, slots=4)
    run(sched, seq("seed", PROMPT[:20]))
    assert sched.limits.route_imbalance == 2
    home = 0  # the first request went to the least-loaded shard, the lowest index on a tie
    seqs = [seq(f"r{i}", PROMPT[:24] + [i], arrival=1.0 + i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    # three hits go home; the fourth would make home 3 ahead of the other shard, more than 2
    assert [s.shard for s in seqs] == [home, home, home, 1 - home, home]
    other = seq("new", [1, 2, 3, 4, 5, 6, 7, 8, 9], arrival=9.0)  # no cached prefix: the least-loaded shard
    sched.add(other)
    sched.schedule()
    assert other.shard == 1 - home


def test_a_request_waits_a_step_for_the_page_another_computes_rather_than_computing_it_too():
    sched = make(page_size=4, prefill_chunk=32, budget=64)  # room for both prompts in one step
    a, b = seq("a", PROMPT[:20], arrival=0.0), seq("b", PROMPT[:20], arrival=1.0)
    eng = run(sched, a, b)
    first = eng.plans[0].chunks
    assert [(c.seq.id, c.start, c.count) for c in first] == [("a", 0, 20)]  # b waits for a's pages
    assert b.cached_tokens == 16 and sched.prefix.stats.prompt_tokens_computed == 20 + 4
    other = seq("c", PROMPT[30:50], arrival=2.0)  # nothing in common: never waits
    d = seq("d", PROMPT[30:50] + [5], arrival=3.0)
    eng = run(sched, other, d)
    assert d.cached_tokens == 20 and other.cached_tokens == 0


def test_a_request_waits_for_a_slot_on_its_full_home_shard_only_while_the_others_are_nearly_full():
    sched = make(data_shards=2, slots=4)
    run(sched, seq("seed", PROMPT[:20]))  # shard 0 holds the prefix
    route = sched.prefix.route
    assert route(seq("x", PROMPT[:24]), [4, 2], 4, 2) is None  # home full, shard 1 within the guard: wait
    assert route(seq("x", PROMPT[:24]), [4, 1], 4, 2) == 1  # shard 1 too idle to wait: recompute there
    assert route(seq("x", PROMPT[:24]), [3, 2], 4, 2) == 0
    assert route(seq("x", [9] * 24), [4, 3], 4, 2) == 1  # nothing cached anywhere: never waits
    assert route(seq("x", PROMPT[:24]), [4, 4], 4, 2) is None  # no free slot at all
