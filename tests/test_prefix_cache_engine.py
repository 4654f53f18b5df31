"""Prefix caching on the real engine (stories260K): outputs identical with and without the cache.

The workload mixes shared prefixes of random lengths (page-aligned and not), requests arriving
together with the same prefix, greedy and seeded sampling, cancellations, preemption under a tight
`kv_pages`, and multi-turn chats whose next prompt is the previous prompt plus its answer.
"""

from __future__ import annotations

import random

import pytest

from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams

PAGE = 8


def make_engine(model, tok, prefix_cache: bool, **kw) -> Engine:
    cfg = dict(max_slots=4, max_context=192, prefill_chunk=24, page_size=PAGE, strict_no_recompile=True, min_bucket=8)
    engine = Engine(model, tok, EngineConfig(**{**cfg, **kw, "prefix_cache": prefix_cache}))
    engine.warmup()
    return engine


def workload(tok, seed: int) -> tuple[list[tuple[int, Request]], dict[int, list[str]]]:
    """(submit step, request) pairs and {step: ids to cancel}: three shared prefixes, each used by several requests."""
    rng = random.Random(seed)
    text = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog."
    base = [tok.bos_id] + tok.encode(text * 3, add_bos=False)
    # prefix lengths: page-aligned, unaligned, and one page-aligned prompt end
    prefixes = [base[: 4 * PAGE], base[: 5 * PAGE + 3], base[: 2 * PAGE + 7]]
    reqs = []
    for i in range(14):
        prefix = prefixes[i % 3]
        tail = [rng.randrange(3, 500) for _ in range(rng.choice([0, 1, 5, PAGE, 11]))]
        if i == 3:
            tail = [rng.randrange(3, 500) for _ in range(PAGE - len(prefix) % PAGE)]  # the prompt ends on a page edge
        sampled = i % 2 == 1
        params = SamplingParams(
            max_tokens=rng.randrange(8, 40),
            temperature=0.9 if sampled else 0.0,
            top_p=0.95 if sampled else 1.0,
            seed=1000 + i if sampled else None,
            ignore_eos=True,
        )
        at = 0 if i < 6 else rng.randrange(0, 25)  # a group arrives together, the rest over time
        reqs.append((at, Request(f"r{i}", prefix + tail, params)))
    cancels = {6: ["r5"], 14: ["r9", "r12"]}
    return reqs, cancels


def drive(engine: Engine, reqs, cancels) -> dict:
    results, step = {}, 0
    pending = sorted(reqs, key=lambda x: x[0])
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.submit(pending.pop(0)[1])
        for rid in cancels.get(step, []):
            res = engine.cancel(rid)
            if res is not None:
                results[rid] = res
        for ev in engine.step():
            if ev.result is not None:
                results[ev.request_id] = ev.result
        step += 1
        assert step < 5000
    return results


def follow_ups(tok, first: dict, prompts: dict, rng: random.Random) -> list[Request]:
    """Second turns: each finished chat's prompt and answer, then a new user turn."""
    out = []
    for rid, res in sorted(first.items()):
        if res.finish_reason == "cancelled":
            continue
        prompt = prompts[rid] + res.token_ids + tok.encode(" Then she said", add_bos=False)
        params = SamplingParams(max_tokens=12, temperature=0.7, seed=rng.randrange(2**31), ignore_eos=True)
        out.append(Request(f"{rid}-turn2", prompt, params))
    return out


@pytest.mark.parametrize("mesh,kv_pages", [("1x1", None), ("2x4", None), ("1x1", 24)])
def test_outputs_are_identical_with_and_without_the_prefix_cache(stories, mesh, kv_pages):
    models, tok = stories
    reqs, cancels = workload(tok, seed=len(mesh) + (kv_pages or 0))
    prompts = {r.id: r.prompt_ids for _, r in reqs}
    runs = {}
    for cached in (False, True):  # the same Request objects (and arrival times) in both runs
        engine = make_engine(models[mesh], tok, cached, kv_pages=kv_pages)
        first = drive(engine, reqs, cancels)
        second = engine.generate(follow_ups(tok, first, prompts, random.Random(7)))
        runs[cached] = (first, {r.id: r for r in second}, engine.status())
    (first_off, second_off, off), (first_on, second_on, on) = runs[False], runs[True]
    assert set(first_on) == set(first_off)
    for rid, res in first_off.items():
        if res.finish_reason == "cancelled" or first_on[rid].finish_reason == "cancelled":
            short, long_ = sorted((res.token_ids, first_on[rid].token_ids), key=len)
            assert long_[: len(short)] == short, rid  # cut at another step, never different
        else:
            assert first_on[rid].token_ids == res.token_ids, rid
    assert set(second_on) == set(second_off) and second_on
    for rid, res in second_off.items():
        assert second_on[rid].token_ids == res.token_ids, rid
    # the cache did the work: hits, fewer prompt tokens computed, and every page back after draining
    assert off.prefix_hit_tokens == 0 and on.prefix_hit_tokens > 0
    assert on.prompt_tokens_computed < off.prompt_tokens_computed
    assert on.prompt_tokens_computed + on.prefix_hit_tokens <= off.prompt_tokens_computed
    assert all(r.cached_tokens > 0 for r in second_on.values())  # a second turn reuses its first
    assert on.pages_used == 0 and on.pages_cached > 0 and off.pages_cached == 0
    assert on.compilations_after_warmup == 0
    if kv_pages:
        assert on.preemptions > 0 and off.preemptions > 0 and on.prefix_evictions > 0


@pytest.mark.slow
def test_every_attention_backend_reads_cached_pages(stories):
    """A second request adopting the first's pages gives the uncached tokens with each backend."""
    models, tok = stories
    text = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog."
    prefix = [tok.bos_id] + tok.encode(text * 2, add_bos=False)
    prompts = [prefix[:33], prefix[:33] + tok.encode(" liked", add_bos=False), prefix[:29]]

    def run(kind, cached):
        engine = make_engine(
            models["1x1"], tok, cached, attention=kind, max_slots=2, max_context=64, prefill_chunk=16, min_bucket=16
        )
        outs = [
            engine.generate([Request(f"{kind}{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))])[0]
            for i, p in enumerate(prompts)  # one after another: each finds the earlier ones' pages
        ]
        return [r.token_ids for r in outs], [r.cached_tokens for r in outs]

    expected, none = run("native", False)
    assert none == [0, 0, 0]
    for kind in ("native", "xla", "pallas"):
        tokens, cached = run(kind, True)
        assert tokens == expected, kind
        assert cached == [0, 32, 24], kind  # whole pages before the page holding the last prompt token
