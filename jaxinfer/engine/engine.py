"""The engine: slots, buckets, warm-up, the step loop and preemption.

Host side, each data shard has `max_slots / data` slots and its own `PageAllocator`. Every step:
  1. admit waiting requests (first come, first served) into free slots, least-loaded shard first;
  2. per shard, schedule one token for every decoding slot, then prompt chunks of prefilling slots
     (at most `prefill_chunk` tokens each) until the step's token budget is spent, allocating pages
     as needed; when pages run out the youngest running request of that shard is preempted (its
     pages freed, re-queued at the front, recomputed later from its prompt and tokens so far);
  3. pad to the smallest token bucket and dispatch the jitted step (compiled once per bucket);
  4. read back the PREVIOUS step's sampled tokens while this one runs on the device.
Tokens sampled at step n feed step n+1 on device (see `step.py`), so the host blocks once per step.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Iterable

import jax
import numpy as np

from jaxinfer.engine import compile_counter
from jaxinfer.engine.requests import Event, Request, RequestError, Result
from jaxinfer.engine.step import StepInputs, attention_impl, build_step_fn
from jaxinfer.engine.stops import StopTextTracker
from jaxinfer.kv_cache import (CacheShape, OutOfPages, PageAllocator, allocate_cache, device_memory,
                               pages_for_memory_fraction, pages_needed)
from jaxinfer.model.forward import ShardedModel
from jaxinfer.sharding import logical_sharding, per_device_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8            # decode slots in total (split evenly over data shards)
    page_size: int = 16
    max_context: int = 1024       # prompt + generated tokens per request
    prefill_chunk: int = 256      # most prompt tokens one request prefills per step
    max_step_tokens: int | None = None  # tokens per data shard per step; None: max(prefill_chunk, slots per shard)
    kv_pages: int | None = None   # pages per data shard; None: from kv_memory_fraction or enough for all slots
    kv_memory_fraction: float | None = None
    attention: str = "auto"       # auto | kernel | native | reference; see resolve_attention
    layer_loop: str = "auto"      # auto (unrolled on CPU, else scan) | scan | unrolled; see jaxinfer.model.llama
    strict_no_recompile: bool = False
    min_bucket: int | None = None  # smallest token bucket; None: see resolve_min_bucket

    def validate(self, data_shards: int, model_limit: int) -> None:
        def bad(field, limit):
            return RequestError(f"--{field.replace('_', '-')} {getattr(self, field)} {limit}")

        if self.max_slots < data_shards or self.max_slots % data_shards:
            raise bad("max_slots", f"must be a positive multiple of the mesh's data axis ({data_shards})")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise bad("page_size", "must be a power of two")
        if not 1 <= self.max_context <= model_limit:
            raise bad("max_context", f"must be in [1, {model_limit}] (the model's max_position_embeddings)")
        if self.prefill_chunk < 1:
            raise bad("prefill_chunk", "must be >= 1")
        if self.max_step_tokens is not None and self.max_step_tokens < self.max_slots // data_shards:
            raise bad("max_step_tokens", f"must be >= the slots per data shard ({self.max_slots // data_shards}), "
                      "so every decoding slot fits in one step")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction < 1:
            raise bad("kv_memory_fraction", "must be in (0, 1)")
        if self.attention not in ATTENTION_KINDS:
            raise bad("attention", "must be " + ", ".join(ATTENTION_KINDS[:-1]) + " or " + ATTENTION_KINDS[-1])
        if self.min_bucket is not None and self.min_bucket < 1:
            raise bad("min_bucket", "must be >= 1")
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise bad("layer_loop", "must be auto, scan or unrolled")


ATTENTION_KINDS = ("auto", "kernel", "native", "reference")


def resolve_attention(kind: str, platform: str) -> str:
    """--attention auto -> the fastest path this platform has: the Pallas kernel on TPU, the native
    C++ kernel on CPU (the XLA path when it cannot be built here, with one log line saying why), the
    XLA path elsewhere. An explicit kind that cannot run on this platform is a RequestError."""
    from jaxinfer import native

    if kind == "auto":
        if platform == "tpu":
            return "kernel"
        if platform == "cpu":
            if native.available():
                return "native"
            log.warning("--attention auto: using the XLA path; the native CPU kernel is unavailable: %s",
                        native.unavailable_reason())
        return "reference"
    if kind == "native":
        if platform != "cpu":
            raise RequestError(f"--attention native: runs only on CPU; this mesh is on {platform}")
        if not native.available():
            raise RequestError(f"--attention native: unavailable on this host: {native.unavailable_reason()}")
    return kind


def resolve_min_bucket(config: EngineConfig, platform: str) -> int:
    """None -> 8 on TPU and GPU (a TPU sublane tile; a step of few tokens is bound by reading the
    weights there, so padding is nearly free), 1 on CPU, where a step's matmuls cost in proportion
    to its tokens (batch-1 decode padded to 8 tokens took 1.45x as long)."""
    if config.min_bucket is not None:
        return config.min_bucket
    return 1 if platform == "cpu" else 8


def token_buckets(config: EngineConfig, data_shards: int, platform: str) -> tuple[int, ...]:
    """Token counts per data shard that steps are padded to (one compiled step each): powers of two
    from the smallest bucket (`resolve_min_bucket`) up to the step's token budget (`max_step_tokens`,
    by default max(prefill_chunk, slots per shard))."""
    budget = config.max_step_tokens or max(config.prefill_chunk, config.max_slots // data_shards)
    smallest = resolve_min_bucket(config, platform)
    return tuple(sorted({min(max(smallest, 2 ** i), budget) for i in range(budget.bit_length() + 1)} | {budget}))


def resolve_layer_loop(config: EngineConfig, platform: str) -> str:
    """auto -> unrolled on CPU (XLA:CPU copies scanned weights out of the stack before each matmul;
    see `jaxinfer.model.llama`), scan on TPU and GPU (compile time independent of depth)."""
    if config.layer_loop != "auto":
        return config.layer_loop
    return "unrolled" if platform == "cpu" else "scan"


class _Seq:
    """A request in flight: its tokens, where its KV lives, and its output so far."""

    def __init__(self, req: Request, detok, eos_ids: tuple[int, ...], seed: int):
        self.req = req
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.inflight = 0          # tokens sampled on device, not yet read back (0 or 1)
        self.num_computed = 0      # tokens whose K/V are in the cache (or being written)
        self.pages: list[int] = []
        self.shard = self.slot = -1
        self.preemptions = 0
        self.first_token_time: float | None = None
        self.detok = detok
        self.text = StopTextTracker(req.params.stop)
        self.stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(eos_ids))
        self.seed = seed
        self.finished: str | None = None

    @property
    def total(self) -> int:
        return len(self.req.prompt_ids) + len(self.generated) + self.inflight

    def known_tokens(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) that the host has (prompt, then generated)."""
        n = len(self.req.prompt_ids)
        head = list(self.req.prompt_ids[start:min(stop, n)])
        return head + self.generated[max(start - n, 0):max(stop - n, 0)] if stop > n else head


class Engine:
    def __init__(self, model: ShardedModel, tokenizer, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        mesh = model.mesh
        self.data = mesh.shape["data"]
        config.validate(self.data, model.config.max_position_embeddings)
        self.slots_per_shard = config.max_slots // self.data
        self.pages_per_slot = pages_needed(config.max_context, config.page_size)
        platform = mesh.devices.flat[0].platform
        kind = self.attention = resolve_attention(config.attention, platform)
        try:  # in place: the model's params take the layout this platform's step runs fastest with
            model.use_layer_loop(resolve_layer_loop(config, platform))
        except ValueError as e:
            raise RequestError(f"--layer-loop {config.layer_loop}: {e}") from None
        one_page = CacheShape(
            layers=model.config.num_layers, data_shards=self.data, pages_per_shard=1,
            page_size=config.page_size, kv_heads=model.layout.kv_heads, head_dim=model.config.head_dim,
            dtype=str(np.dtype(model.dtype)))
        self.cache_shape = dataclasses.replace(one_page, pages_per_shard=self._resolve_pages(one_page))
        self.allocators = [PageAllocator(self.cache_shape.pages_per_shard) for _ in range(self.data)]
        self.slots: list[list[_Seq | None]] = [[None] * self.slots_per_shard for _ in range(self.data)]
        self.buckets = token_buckets(config, self.data, platform)
        self.cache = allocate_cache(mesh, self.cache_shape, per_layer=model.layer_loop == "unrolled")
        # step inputs are split over data shards on their leading axis; built once, used every step
        self._by_ndim = {n: logical_sharding(mesh, ("batch",) + (None,) * (n - 1)) for n in (1, 2, 3)}
        self._row = self._by_ndim[2]
        self._step_fn = build_step_fn(model, self.cache_shape, attention_impl(kind), self._row)
        self._prev = jax.device_put(np.zeros((self.data, self.slots_per_shard), np.int32), self._row)
        self.waiting: collections.deque[_Seq] = collections.deque()
        self._pending = None  # (device outputs, [(seq, shard, slot)] sampled) of the dispatched step
        self.stats = collections.Counter()
        self._compiles_at_warmup: int | None = None
        log.info("KV cache: %d pages/shard x %d shards of %d tokens = %.1f MiB; %d slots; buckets %s; attention %s",
                 self.cache_shape.pages_per_shard, self.data, config.page_size,
                 self.cache_shape.total_bytes / 2**20, config.max_slots, self.buckets, kind)

    # ---- configuration -------------------------------------------------------------------
    def _resolve_pages(self, one_page: CacheShape) -> int:
        c, m = self.config, self.model
        enough = self.slots_per_shard * self.pages_per_slot
        if c.kv_pages is not None:
            if c.kv_pages < self.pages_per_slot:
                raise RequestError(f"--kv-pages {c.kv_pages} is below the {self.pages_per_slot} pages one "
                                   f"request of --max-context {c.max_context} needs")
            return c.kv_pages
        if c.kv_memory_fraction is None:
            return enough
        try:
            limit, in_use = device_memory(m.mesh.devices.flat[0])
        except ValueError as e:
            raise RequestError(f"--kv-memory-fraction: {e}; use --kv-pages instead") from None
        if in_use is None:  # host devices: what this engine put there so far is its weights
            in_use = per_device_bytes(m.params)
        pages = pages_for_memory_fraction(limit, c.kv_memory_fraction, in_use, one_page, m.mesh.shape["tensor"])
        if pages < self.pages_per_slot:
            raise RequestError(f"--kv-memory-fraction {c.kv_memory_fraction} leaves room for {pages} pages, "
                               f"below the {self.pages_per_slot} one request needs")
        return pages

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.max_context - 1

    # ---- compilation -------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compiles the step for every bucket (running it on idle inputs); returns seconds taken."""
        start = time.perf_counter()
        for bucket in self.buckets:
            inputs = self._empty_inputs(bucket)
            tokens, _, self.cache = self._step_fn(self.model.params, self.cache, inputs, self._prev)
            tokens.block_until_ready()
        self._compiles_at_warmup = compile_counter.count()
        return time.perf_counter() - start

    @property
    def compilations_after_warmup(self) -> int:
        if self._compiles_at_warmup is None:
            return 0
        return compile_counter.count() - self._compiles_at_warmup

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        if n > self.max_prompt_tokens:
            raise RequestError(f"prompt has {n} tokens, above the limit of {self.max_prompt_tokens} "
                               f"(--max-context {self.config.max_context} minus 1 for the first output token)")
        vocab = self.model.config.vocab_size
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token_ids contains {bad[0]}, outside the vocabulary [0, {vocab})")
        req.params.validate(max_tokens_limit=self.config.max_context, vocab_size=vocab)

    def submit(self, req: Request) -> None:
        self.validate(req)
        seed = req.params.seed if req.params.seed is not None else (hash(req.id) & 0xFFFFFFFF)
        detok = None
        if self.tokenizer is not None:
            detok = self.tokenizer.detokenizer()
            detok.add(req.prompt_ids[-1])  # prime with the prompt's end so a continuation keeps its leading space
            detok.flush()
        self.waiting.append(_Seq(req, detok, tuple(self.model.config.eos_token_ids if self.tokenizer is None
                                                   else self.tokenizer.eos_ids), seed))

    def cancel(self, request_id: str) -> Result | None:
        """Ends a request now; its slot and pages are free for the next step."""
        for seq in list(self.waiting) + [s for shard in self.slots for s in shard if s is not None]:
            if seq.req.id == request_id and not seq.finished:
                return self._finish(seq, "cancelled")
        return None

    def has_work(self) -> bool:
        return bool(self.waiting) or self._pending is not None or any(s for shard in self.slots for s in shard)

    @property
    def active_slots(self) -> int:
        return sum(s is not None for shard in self.slots for s in shard)

    @property
    def pages_used(self) -> int:
        return sum(a.used for a in self.allocators)

    @property
    def pages_total(self) -> int:
        return sum(a.num_pages for a in self.allocators)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Dispatches one step (if there is work) and returns the events of the step before it."""
        dispatched = self._dispatch()
        events = self._collect(self._pending) if self._pending is not None else []
        self._pending = dispatched
        if self.config.strict_no_recompile and self.compilations_after_warmup:
            raise compile_counter.RecompileError(
                f"{self.compilations_after_warmup} XLA compilation(s) after warm-up (--strict-no-recompile)")
        return events

    def generate(self, requests: Iterable[Request], on_event=None) -> list[Result]:
        """Runs `requests` to completion; results in input order."""
        order = []
        for req in requests:
            self.submit(req)
            order.append(req.id)
        results = {}
        while self.has_work():
            for ev in self.step():
                if on_event:
                    on_event(ev)
                if ev.result is not None:
                    results[ev.request_id] = ev.result
        return [results[i] for i in order]

    # ---- scheduling --------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting:
            free = [(sum(s is None for s in shard), -d) for d, shard in enumerate(self.slots)]
            count, neg_d = max(free)
            if count == 0 or self.waiting[0].inflight:  # a preempted request's last token is still in flight
                return
            seq = self.waiting.popleft()
            seq.shard = -neg_d
            seq.slot = self.slots[seq.shard].index(None)
            self.slots[seq.shard][seq.slot] = seq

    def _preempt_youngest(self, shard: int) -> _Seq:
        running = [s for s in self.slots[shard] if s is not None]
        victim = max(running, key=lambda s: (s.req.arrival_time, s.req.id))
        self.allocators[shard].release(victim.pages)
        victim.pages, victim.num_computed = [], 0
        self.slots[shard][victim.slot] = None
        victim.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(victim)
        log.info("preempted request %s (KV pages exhausted on data shard %d); it will be recomputed",
                 victim.req.id, shard)
        return victim

    def _schedule_shard(self, shard: int, budget: int):
        """-> list of (seq, start, count) for this shard, decodes first, then prefill chunks."""
        alloc = self.allocators[shard]
        running = sorted((s for s in self.slots[shard] if s is not None), key=lambda s: (s.req.arrival_time, s.req.id))
        decodes = [s for s in running if s.total - s.num_computed == 1]
        prefills = [s for s in running if s.total - s.num_computed > 1]
        plan = []
        for seq in decodes + prefills:
            if self.slots[shard][seq.slot] is not seq or budget == 0:
                continue
            if (seq.total - seq.num_computed == 1 and
                    (len(seq.generated) + seq.inflight >= seq.req.params.max_tokens
                     or seq.total >= self.config.max_context)):
                continue  # finished by length; collected when its last token is read back
            count = min(seq.total - seq.num_computed, budget, self.config.prefill_chunk)
            while True:
                need = pages_needed(seq.num_computed + count, self.config.page_size) - len(seq.pages)
                try:
                    seq.pages += alloc.allocate(max(need, 0))
                    break
                except OutOfPages:
                    victim = self._preempt_youngest(shard)
                    plan = [p for p in plan if p[0] is not victim]
                    if victim is seq:
                        break
            if self.slots[shard][seq.slot] is not seq:
                continue
            plan.append((seq, seq.num_computed, count))
            budget -= count
        return plan

    def _dispatch(self):
        self._admit()
        budget = self.buckets[-1]
        plans = [self._schedule_shard(d, budget) for d in range(self.data)]
        if not any(plans):
            return None
        used = max(sum(c for _, _, c in p) for p in plans)
        bucket = next(b for b in self.buckets if b >= used)
        inputs, sampled = self._build_inputs(plans, bucket)
        tokens, logprobs, self.cache = self._step_fn(self.model.params, self.cache, inputs, self._prev)
        self._prev = tokens
        self.stats["steps"] += 1
        self.stats[f"bucket_{bucket}"] += 1
        for seq, start, count in (p for plan in plans for p in plan):
            seq.num_computed = start + count
        for seq in sampled:
            seq.inflight += 1
        return tokens, logprobs, [(seq, seq.shard, seq.slot) for seq in sampled]

    def _empty_inputs(self, bucket: int) -> StepInputs:
        return self._to_device(self._empty_host(bucket))

    def _build_inputs(self, plans, bucket: int):
        """Host arrays of one step, built with a few numpy ops per shard (a Python loop over slots costs
        milliseconds of host time per step at batch 32, taken from the device's cores on CPU)."""
        host = self._empty_host(bucket)
        page = self.config.page_size
        sampled = []
        for d, plan in enumerate(plans):
            if not plan:
                continue  # no tokens: cu_q_lens stays all zero
            plan = sorted(plan, key=lambda p: p[0].slot)  # the step's tokens are laid out slot by slot
            seqs = [seq for seq, _, _ in plan]
            slots = np.array([seq.slot for seq in seqs], np.int32)
            starts = np.array([start for _, start, _ in plan], np.int32)
            counts = np.array([count for _, _, count in plan], np.int32)
            known = np.array([len(seq.req.prompt_ids) + len(seq.generated) for seq in seqs], np.int32)
            first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)  # each entry's first token
            n = int(counts.sum())
            by_slot = np.zeros(self.slots_per_shard, np.int32)
            by_slot[slots] = counts
            host["cu_q_lens"][d, 1:] = np.cumsum(by_slot)
            entry = np.repeat(np.arange(len(plan)), counts)
            pos = starts[entry] + np.arange(n, dtype=np.int32) - first[entry]
            for seq, (_, start, count), f in zip(seqs, plan, first.tolist()):
                host["page_indices"][d, seq.slot, :len(seq.pages)] = seq.pages
                have = seq.known_tokens(start, start + count)  # the rest come from the previous step's samples
                host["tokens"][d, f:f + len(have)] = have
            host["use_prev"][d, :n] = pos >= known[entry]
            host["prev_slot"][d, :n] = slots[entry]
            host["positions"][d, :n] = pos
            host["write_page"][d, :n] = host["page_indices"][d, slots[entry], pos // page]
            host["write_offset"][d, :n] = pos % page
            host["kv_lens"][d, slots] = starts + counts
            done = [e for e, seq in enumerate(seqs) if starts[e] + counts[e] == seq.total]  # sample the next token
            if done:
                at = slots[done]
                params = [seqs[e].req.params for e in done]
                host["sample_index"][d, at] = first[done] + counts[done] - 1
                host["temperature"][d, at] = [p.temperature for p in params]
                host["top_k"][d, at] = [p.top_k for p in params]
                host["top_p"][d, at] = [p.top_p for p in params]
                host["min_p"][d, at] = [p.min_p for p in params]
                host["seed"][d, at] = [seqs[e].seed for e in done]
                host["position"][d, at] = starts[done] + counts[done]
                host["logprobs"][d, at] = [p.logprobs for p in params]
                sampled += [seqs[e] for e in done]
        return self._to_device(host), sampled

    def _empty_host(self, bucket: int) -> dict:
        d, s, w = self.data, self.slots_per_shard, self.pages_per_slot
        return dict(
            tokens=np.zeros((d, bucket), np.int32), use_prev=np.zeros((d, bucket), bool),
            prev_slot=np.zeros((d, bucket), np.int32), positions=np.full((d, bucket), -1, np.int32),
            write_page=np.full((d, bucket), self.cache_shape.pages_per_shard, np.int32),
            write_offset=np.zeros((d, bucket), np.int32), kv_lens=np.zeros((d, s), np.int32),
            page_indices=np.zeros((d, s, w), np.int32), cu_q_lens=np.zeros((d, s + 1), np.int32),
            num_seqs=np.full((d, 1), s, np.int32), sample_index=np.zeros((d, s), np.int32),
            temperature=np.zeros((d, s), np.float32), top_k=np.zeros((d, s), np.int32),
            top_p=np.ones((d, s), np.float32), min_p=np.zeros((d, s), np.float32),
            seed=np.zeros((d, s), np.uint32), position=np.zeros((d, s), np.int32),
            logprobs=np.zeros((d, s), bool))

    def _to_device(self, host: dict) -> StepInputs:
        # one batched transfer per step: per-array device_put calls cost the host (and on CPU the
        # device's) time every step
        return StepInputs.from_flat(jax.device_put(host, {k: self._by_ndim[a.ndim] for k, a in host.items()}))

    # ---- results -----------------------------------------------------------------------------
    def _collect(self, pending) -> list[Event]:
        tokens_dev, logprobs_dev, sampled = pending
        tokens, logprobs = np.asarray(tokens_dev), np.asarray(logprobs_dev)
        events = []
        for seq, shard, slot in sampled:
            seq.inflight -= 1
            if seq.finished:
                continue
            token, logprob = int(tokens[shard, slot]), float(logprobs[shard, slot])
            now = time.monotonic()
            seq.first_token_time = seq.first_token_time or now
            seq.generated.append(token)
            seq.logprobs.append(logprob)
            text, reason = "", None
            if token in seq.stop_ids:
                reason = "stop"  # the stop token is returned in token_ids, never in text
            else:
                text = seq.text.push(seq.detok.add(token) if seq.detok else "")
                reason = "stop" if seq.text.stopped else None
            if reason is None and (len(seq.generated) >= seq.req.params.max_tokens
                                   or len(seq.req.prompt_ids) + len(seq.generated) >= self.config.max_context):
                reason = "length"
            if reason is not None and not seq.text.stopped:
                text += seq.text.push(seq.detok.flush() if seq.detok else "") + seq.text.finish()
            lp = [logprob] if seq.req.params.logprobs else None
            ev = Event(seq.req.id, [token], text, lp)
            if reason is not None:
                ev.result = self._finish(seq, reason)
            events.append(ev)
        return events

    def _finish(self, seq: _Seq, reason: str) -> Result:
        seq.finished = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.shard >= 0 and self.slots[seq.shard][seq.slot] is seq:
            self.slots[seq.shard][seq.slot] = None
            self.allocators[seq.shard].release(seq.pages)
            seq.pages = []
        self.stats[f"finish_{reason}"] += 1
        now = time.monotonic()
        return Result(
            id=seq.req.id, token_ids=list(seq.generated), text=seq.text.text, finish_reason=reason,
            prompt_tokens=len(seq.req.prompt_ids), logprobs=list(seq.logprobs) if seq.req.params.logprobs else None,
            ttft_s=(seq.first_token_time - seq.req.arrival_time) if seq.first_token_time else None,
            total_s=now - seq.req.arrival_time, preemptions=seq.preemptions)
