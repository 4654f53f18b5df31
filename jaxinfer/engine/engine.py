"""The Engine facade: submit, cancel, step, and a status snapshot, over four parts:

    Scheduler (pure host: slots, pages, admission, chunks, preemption)  -> StepPlan
    HostBatchBuilder (numpy arrays of the plan, packed: one transfer)     -> PackedInputs
    the jitted step (model + paged attention + sampling; cache donated)   -> tokens on device
    OutputStream per request (detokenizer, stop strings, results)         -> Events

Tokens sampled at step n feed step n+1 on device, so `step()` dispatches step n+1 before it reads
step n's tokens back: the host blocks once per step, while the device works. A speculating slot
(`jaxinfer.engine.speculation`) needs its tokens before its next window, so a step holding one is
read back before the next is dispatched.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable

import jax
import numpy as np

from jaxinfer import platform as platforms
from jaxinfer.config import ConfigError
from jaxinfer.engine import compile_counter
from jaxinfer.engine.capacity import page_shapes, page_table_width, resolve_pages
from jaxinfer.engine.config import EngineConfig, token_buckets
from jaxinfer.engine.executables import StartupReport, compile_pipelined
from jaxinfer.engine.head_step import step_draft
from jaxinfer.engine.output import OutputStream
from jaxinfer.engine.packed_inputs import PackedInputs, abstract_inputs, input_sharding
from jaxinfer.engine.prefix_cache import model_salt
from jaxinfer.engine.readback import PendingStep, pending_step, read_prompt_logprobs, read_samples
from jaxinfer.engine.requests import Event, Request, RequestError, Result
from jaxinfer.engine.sampler_state import RowSetter, allocate_state, penalty_rows
from jaxinfer.engine.scheduler import Scheduler, SchedulerLimits, Sequence, StepPlan
from jaxinfer.engine.speculation import Speculation
from jaxinfer.engine.status import EngineStatus, engine_status
from jaxinfer.engine.step import build_step_fn
from jaxinfer.engine.step_inputs import HostBatchBuilder
from jaxinfer.engine.step_registry import StepRegistry, key_bucket, key_order, verify_key
from jaxinfer.kv_cache import allocate_cache
from jaxinfer.model.forward import ShardedModel
from jaxinfer.sharding import per_device_bytes

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: ShardedModel,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        platform: platforms.Platform | None = None,
        draft: ShardedModel | None = None,
    ):
        mesh = model.mesh
        self.data, self.sequence = mesh.shape["data"], mesh.shape["sequence"]
        config.validate(self.data, model.config.max_position_embeddings)
        self.platform = platform or platforms.for_mesh(mesh, config.attention, config.layer_loop, config.min_bucket)
        for which, m in (("model", model), ("draft model", draft)):
            if m is not None and m.layer_loop != self.platform.layer_loop:
                raise ConfigError(
                    f"--layer-loop {self.platform.layer_loop}: the {which} was loaded with layer loop "
                    f"{m.layer_loop}; load it with layer_loop={self.platform.layer_loop!r}"
                )
        self.model, self.tokenizer, self.config, self.draft = model, tokenizer, config, draft
        slots = config.max_slots // self.data
        pages_per_slot = page_table_width(config.max_context, config.page_size, self.sequence)
        kv_dtype = config.cache_dtype(model.dtype)
        one_page, draft_page, both = page_shapes(model, draft, self.data, config.page_size, kv_dtype)
        other = per_device_bytes(draft.params) if draft else 0
        per_device = resolve_pages(config, model, both, pages_per_slot, self.data, other, self.sequence)
        pages = per_device * self.sequence  # a data shard's pages, dealt over its sequence shards (`pages`)
        self.cache_shape = dataclasses.replace(one_page, pages_per_shard=pages)
        self.buckets = token_buckets(config.step_budget(self.data), self.platform.min_bucket, self.sequence)
        k = config.num_speculative_tokens if config.speculative != "none" else 0
        cached = draft is not None and not draft.config.feature_head
        spec = Speculation(config.speculative, k, self.buckets, self.data, config.speculative_adaptive, cached)
        self.speculation = spec if k else None
        self.scheduler = Scheduler(
            SchedulerLimits(
                data_shards=self.data,
                slots_per_shard=slots,
                pages_per_shard=pages,
                page_size=config.page_size,
                max_context=config.max_context,
                prefill_chunk=config.prefill_chunk,
                buckets=self.buckets,
                prefix_cache=config.prefix_cache,
                draft_tokens=k if draft is not None else 0,
                sequence_shards=self.sequence,
            ),
            cache_salt=model_salt(model.config, str(np.dtype(model.dtype))),
            proposer=self.speculation.proposer if self.speculation else None,
        )
        self.inputs = HostBatchBuilder(self.data, slots, pages_per_slot, pages, config.page_size, k)
        self.cache = allocate_cache(mesh, self.cache_shape, model.layer_loop)
        self._params = model.params
        draft_spec = None
        if draft is not None:  # a feature head keeps no cache: it reads the target's states
            draft_shape = None if draft.config.feature_head else dataclasses.replace(draft_page, pages_per_shard=pages)
            draft_cache = None if draft_shape is None else allocate_cache(mesh, draft_shape, draft.layer_loop)
            self.cache, self._params = (self.cache, draft_cache), (model.params, draft.params)
            draft_spec = step_draft(model, draft, draft_shape, k, config.page_size, pages)
        self._input_sharding = input_sharding(mesh)  # the packed inputs' (`packed_inputs`), every bucket's
        self._step_fn = build_step_fn(model, self.cache_shape, self.platform, draft_spec)
        # step keys: each bucket's plain step, and with speculation its verify variant (`step_registry`)
        self.step_keys = tuple(self.buckets) + (tuple(verify_key(b) for b in self.buckets if b > 1) if k else ())
        self.executables = StepRegistry()
        self.startup = StartupReport()
        self.state = allocate_state(mesh, self.data, slots, model.config.vocab_size)  # donated to each step
        self.penalty_rows = RowSetter(mesh, self.data, slots, model.config.vocab_size)
        self._abstract_args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            (self._params, self.cache, self.state),
        )
        self._place_per_process = jax.process_count() > 1  # the mesh spans processes (`_to_device`)
        self.replicas = None  # multi-host leader: told each device call first (`jaxinfer.multihost.replica`)
        self._streams: dict[str, OutputStream] = {}
        self._pending: PendingStep | None = None  # the dispatched step, read back after the next is dispatched
        self._dispatched_at: tuple[float, bool, int] | None = None  # when the last step left, its variant, bucket
        self._collected_at: float | None = None  # when the last step was read back
        self._steps = 0
        self._steps_by_bucket: collections.Counter = collections.Counter()
        self._finished: collections.Counter = collections.Counter()
        self._compiles_at_warmup: int | None = None
        log.info(
            "KV cache: %d pages/shard x %d shards of %d tokens = %.1f MiB, %s, %.0f bytes per token; %d slots; "
            "buckets %s; attention %s; prefix cache %s; speculation %s",
            per_device,
            self.data * self.sequence,
            config.page_size,
            self.cache_shape.total_bytes / 2**20,
            kv_dtype,
            self.cache_shape.bytes_per_token,
            config.max_slots,
            self.buckets,
            self.platform.attention,
            "on" if config.prefix_cache else "off",
            f"{config.speculative}, {k} tokens" if k else "off",
        )

    # ---- compiled steps ----------------------------------------------------------------------
    def lower(self, key):
        """Traces and lowers the step of `key` (a bucket, or its verify variant) from abstract arguments
        (safe on any thread)."""
        params, cache, state = self._abstract_args
        return self._step_fn.lower(params, cache, abstract_inputs(self.inputs, self.model.mesh, key), state)

    def keys_for(self, buckets) -> list:
        """The step keys of `buckets`: each plain step, and its verify variant when there is one."""
        return [key for key in self.step_keys if key_bucket(key) in set(buckets)]

    def compile(self, keys) -> dict:
        """{key: executable} for `keys`: each traced and handed to a thread pool that compiles it while
        the next is traced; the time and counts go into `self.startup`."""
        report = self.startup
        hits = compile_counter.cache_hits()
        compiled, trace_s, compile_s = compile_pipelined(self.lower, keys)
        report.trace_s += trace_s
        report.compiled += len(compiled)
        report.compile_s += compile_s
        report.cache_hits += compile_counter.cache_hits() - hits
        return compiled

    def install(self, executables: dict, proven: bool = False) -> None:
        """Makes compiled or loaded executables available to the next step (callable from any thread).
        Unless `proven` (loaded from disk), each is run once on idle inputs when the engine is idle
        (`warm_one`), so its first-run work does not land on a request."""
        self.executables.install(executables, proven)

    @property
    def compiling(self):
        return self.executables.compiling

    @compiling.setter
    def compiling(self, thread) -> None:
        self.executables.compiling = thread

    @property
    def unproven_buckets(self) -> tuple:
        return self.executables.unproven

    def warm_one(self) -> bool:
        """Runs the smallest installed step that has never run, if the engine is idle; True if it ran one."""
        if self.has_work() or not self.unproven_buckets:
            return False
        self.run_idle(self.unproven_buckets[:1])
        return True

    @property
    def ready_keys(self) -> tuple:
        return self.executables.keys

    @property
    def ready_buckets(self) -> tuple[int, ...]:
        return tuple(k for k in self.ready_keys if isinstance(k, int))

    def run_idle(self, keys) -> None:
        """Runs each of `keys` once on idle inputs (a first run of a freshly compiled executable)."""
        self._take_installed()
        start = time.perf_counter()
        for key in keys:
            self.executables.ran(key)
            step = self.executables.get(key)
            inputs = self._to_device(self.inputs.idle(key))
            with self._replicated("idle", bucket=key):
                outputs, self.cache, self.state = step(self._params, self.cache, inputs, self.state)
                outputs.samples.tokens.block_until_ready()
        self.startup.run_s += time.perf_counter() - start

    def mark_warm(self) -> None:
        """From now on every compilation counts as a recompile (and fails with --strict-no-recompile)."""
        if not self.penalty_rows.ready:  # first needed by a request: compiled now unless start-up loaded it
            self.penalty_rows.install(self.penalty_rows.compile())
        self._compiles_at_warmup = compile_counter.count()

    # ---- facade ------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compiles every step not yet installed (concurrently), runs each new one once on idle inputs,
        and marks the engine warm; returns seconds taken."""
        start = time.perf_counter()
        self.install(self.compile([k for k in self.step_keys if k not in self.ready_keys]))
        self.run_idle(self.unproven_buckets)
        self.mark_warm()
        return time.perf_counter() - start

    @property
    def compilations_after_warmup(self) -> int:
        if self._compiles_at_warmup is None:
            return 0
        return compile_counter.count() - self._compiles_at_warmup

    def submit(self, request: Request) -> None:
        """Queues a request that the request builder validated; its id must not be in flight. One without
        a seed gets one from the OS, reported in its result, so a sampled output can always be reproduced."""
        if request.id in self._streams:  # results are matched to requests by id: a second would never finish
            raise RequestError(f"request id {request.id!r} is already in flight")
        eos = tuple(self.model.config.eos_token_ids if self.tokenizer is None else self.tokenizer.eos_ids)
        seq = Sequence(request, request.params.seed if request.params.seed is not None else secrets.randbits(32))
        self._streams[request.id] = OutputStream(seq, self.tokenizer, eos, self.config.max_context)
        self.scheduler.add(seq)

    def cancel(self, request_id: str) -> Result | None:
        """Ends a request now; its slot and pages are free for the next step. None if not in flight."""
        seq = self.scheduler.find(request_id)
        return self._finish(seq, "cancelled") if seq is not None else None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def step(self) -> list[Event]:
        """Dispatches one step (if there is work) and returns the events of the step before it; when a
        slot of that step speculates next, its tokens are read back first (they choose its window)."""
        if self.speculation is not None:
            self.speculation.decide(self.scheduler.running())
        events = []
        reading = self.replicas.failures("reading back a step's results") if self.replicas else contextlib.nullcontext()
        with reading:  # a multi-host step's failure (a lost process) often shows only here
            if self._pending is not None and self._pending.needs_readback:
                events, self._pending = self._collect(self._pending), None
            dispatched = self._dispatch()
            events += self._collect(self._pending) if self._pending is not None else []
        self._pending = dispatched
        self._collected_at = self._collected_at if self.has_work() else None  # an idle gap is no step time
        if self.config.strict_no_recompile and self.compilations_after_warmup:
            raise compile_counter.RecompileError(
                f"{self.compilations_after_warmup} XLA compilation(s) after warm-up (--strict-no-recompile)"
            )
        return events

    def generate(self, requests: Iterable[Request], on_event=None) -> list[Result]:
        """Runs `requests` to completion; results in input order."""
        requests = list(requests)
        for req in requests:
            self.submit(req)
        results = {}
        while self.has_work():
            for ev in self.step():
                if on_event:
                    on_event(ev)
                if ev.result is not None:
                    results[ev.request_id] = ev.result
        return [results[req.id] for req in requests]

    def status(self) -> EngineStatus:
        return engine_status(self)

    # ---- internals ---------------------------------------------------------------------------
    def _take_installed(self) -> None:
        if self.executables.take_arrived():
            ready = sorted(self.executables.ready, key=key_order)
            self.scheduler.use_buckets(tuple(k for k in ready if isinstance(k, int)))
            self.scheduler.verify_buckets = {key_bucket(k) for k in ready if isinstance(k, str)}

    def _dispatch(self):
        if not self.ready_keys:
            self.warmup()  # nothing compiled yet: compile everything now, before the first step
        self._take_installed()
        plan: StepPlan | None = self.scheduler.schedule(self.draft is not None and self.speculation.following)
        self._write_penalty_rows()
        if plan is None:
            return None
        host = self.inputs.build(plan)
        key = verify_key(plan.bucket) if plan.verifies else plan.bucket
        self.executables.ran(key)  # if it never ran, this real step is its first run
        with self._replicated("step", host, bucket=key):
            outputs = self._run_step(key, host)
        self._time_step(plan)
        self._steps_by_bucket[plan.bucket] += 1
        return pending_step(outputs, plan, self.inputs.slots_per_shard)

    def _time_step(self, plan: StepPlan) -> None:
        """Measures the time between dispatches, for the speculation policy's step-time estimates."""
        now = time.perf_counter()
        if self.speculation is not None and self._dispatched_at is not None:
            then, verify, bucket = self._dispatched_at
            self.speculation.times.record(verify, bucket, now - then)
        self._dispatched_at = (now, plan.verifies, plan.bucket)

    def _run_step(self, key, host: dict):
        step = self.executables.get(key)
        outputs, self.cache, self.state = step(self._params, self.cache, self._to_device(host), self.state)
        self._steps += 1
        return outputs

    # ---- multi-host workers: the leader's device calls, repeated (`jaxinfer.multihost.replica`) ----
    def replay_step(self, key, host: dict) -> None:
        self.executables.ran(key)
        self._run_step(key, host)

    def replay_rows(self, shard: int, slot: int, rows) -> None:
        self.state = self.penalty_rows(self.state, shard, slot, rows)

    def block_until_ready(self) -> None:
        jax.block_until_ready((self.cache, self.state))

    def _write_penalty_rows(self) -> None:
        """Each newly admitted request with penalties or a bias gets its slot's rows written from scratch."""
        for seq in self.scheduler.take_admitted():
            params = seq.request.params
            if params.penalized:
                rows = penalty_rows(params, seq.request.prompt_ids, seq.generated, self.model.config.vocab_size)
                with self._replicated("rows", dataclasses.asdict(rows), shard=seq.shard, slot=seq.slot):
                    self.state = self.penalty_rows(self.state, seq.shard, seq.slot, rows)

    def _replicated(self, kind: str, arrays: dict | None = None, **meta):
        """Around a device call: a multi-host leader sends it to the other processes first, and a call
        that fails here after they got it ends the cluster (they would wait in its collectives)."""
        return self.replicas.call(kind, meta, arrays) if self.replicas is not None else contextlib.nullcontext()

    def _to_device(self, host: dict) -> PackedInputs:
        """The step's host arrays packed into one array (`packed_inputs`), placed with one transfer."""
        packed = PackedInputs.pack(host)
        words, sharding = packed.words, self._input_sharding
        if self._place_per_process:
            # each process holds the same host arrays and places only its own devices' slices: device_put
            # into a mesh that spans processes would compile and run a cross-process equality check
            words = jax.make_array_from_callback(words.shape, sharding, lambda index: packed.words[index])
        else:
            words = jax.device_put(words, sharding)
        return dataclasses.replace(packed, words=words)

    def _collect(self, pending: PendingStep) -> list[Event]:
        read_prompt_logprobs(pending, self._streams)
        events, produced = [], 0
        for window in read_samples(pending):
            seq = window.seq
            self.scheduler.accept(seq, window.tokens, window.sampled)
            produced += len(window.tokens)
            if window.proposed and self.speculation is not None:
                self.speculation.record(seq, window.proposed, len(window.tokens) - 1)
            if seq.finished:
                continue
            seq.draft_proposals = window.draft_proposals
            event, reason = self._streams[seq.id].add_many(window.tokens, window.logprobs, window.top)
            if reason is not None:
                event.result = self._finish(seq, reason)
            events.append(event)
        self._measure(pending, produced)
        return events

    def _measure(self, pending: PendingStep, produced: int) -> None:
        """Output tokens per second between collections, for the speculation policy's measured rates."""
        now = time.perf_counter()
        if self.speculation is not None and self._collected_at is not None:
            verifies = any(c.chunk.proposals for c in pending.sampled_chunks)
            self.speculation.rates.record(len(pending.sampled_chunks), verifies, produced, now - self._collected_at)
        self._collected_at = now

    def _finish(self, seq: Sequence, reason: str) -> Result:
        self.scheduler.finish(seq, reason)
        self._finished[reason] += 1
        return self._streams.pop(seq.id).result(reason)
