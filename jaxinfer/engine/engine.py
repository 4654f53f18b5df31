"""The Engine facade: submit, cancel, step, and a status snapshot, over four parts:

    Scheduler (pure host: slots, pages, admission, chunks, preemption)  -> StepPlan
    HostBatchBuilder (numpy arrays of the plan, one transfer)             -> StepInputs
    the jitted step (model + paged attention + sampling; cache donated)   -> tokens on device
    OutputStream per request (detokenizer, stop strings, results)         -> Events

Tokens sampled at step n feed step n+1 on device, so `step()` dispatches step n+1 before it reads
step n's tokens back: the host blocks once per step, while the device works.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Iterable

import jax
import numpy as np

from jaxinfer import platform as platforms
from jaxinfer.config import ConfigError
from jaxinfer.engine import compile_counter
from jaxinfer.engine.config import EngineConfig, refuse_sequence_axis, token_buckets
from jaxinfer.engine.executables import StartupReport, compile_pipelined
from jaxinfer.engine.output import OutputStream
from jaxinfer.engine.pages import pages_needed
from jaxinfer.engine.prefix_cache import model_salt
from jaxinfer.engine.readback import PendingStep, pending_step, read_prompt_logprobs, read_samples
from jaxinfer.engine.requests import Event, Request, Result
from jaxinfer.engine.sampler_state import RowSetter, allocate_state, penalty_rows
from jaxinfer.engine.scheduler import Scheduler, SchedulerLimits, Sequence, StepPlan
from jaxinfer.engine.status import EngineStatus
from jaxinfer.engine.step import build_step_fn
from jaxinfer.engine.step_inputs import HostBatchBuilder, StepInputs, abstract_inputs, input_shardings
from jaxinfer.kv_cache import CacheShape, allocate_cache, device_memory, local_device, pages_for_memory_fraction
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
    ):
        mesh = model.mesh
        refuse_sequence_axis(mesh.shape["sequence"])
        self.data = mesh.shape["data"]
        config.validate(self.data, model.config.max_position_embeddings)
        self.platform = platform or platforms.for_mesh(mesh, config.attention, config.layer_loop, config.min_bucket)
        if model.layer_loop != self.platform.layer_loop:
            raise ConfigError(
                f"--layer-loop {self.platform.layer_loop}: the model was loaded with layer loop "
                f"{model.layer_loop}; load it with layer_loop={self.platform.layer_loop!r}"
            )
        self.model, self.tokenizer, self.config = model, tokenizer, config
        slots = config.max_slots // self.data
        pages_per_slot = pages_needed(config.max_context, config.page_size)
        one_page = CacheShape(
            layers=model.config.num_layers,
            data_shards=self.data,
            pages_per_shard=1,
            page_size=config.page_size,
            kv_heads=model.layout.kv_heads,
            head_dim=model.config.head_dim,
            dtype=str(np.dtype(model.dtype)),
        )
        self.cache_shape = dataclasses.replace(one_page, pages_per_shard=self._resolve_pages(one_page, pages_per_slot))
        self.buckets = token_buckets(config.step_budget(self.data), self.platform.min_bucket)
        self.scheduler = Scheduler(
            SchedulerLimits(
                data_shards=self.data,
                slots_per_shard=slots,
                pages_per_shard=self.cache_shape.pages_per_shard,
                page_size=config.page_size,
                max_context=config.max_context,
                prefill_chunk=config.prefill_chunk,
                buckets=self.buckets,
                prefix_cache=config.prefix_cache,
            ),
            cache_salt=model_salt(model.config, str(np.dtype(model.dtype))),
        )
        self.inputs = HostBatchBuilder(
            self.data, slots, pages_per_slot, self.cache_shape.pages_per_shard, config.page_size
        )
        self.cache = allocate_cache(mesh, self.cache_shape, model.layer_loop)
        self._input_shardings = input_shardings(mesh, self.inputs.empty(1))  # the same for every bucket
        self._step_fn = build_step_fn(model, self.cache_shape, self.platform)
        self._executables: dict[int, object] = {}  # bucket -> compiled step, as the engine thread sees them
        self._arrived: dict[int, object] = {}  # installed by any thread, taken up at the next step
        self._unproven: set[int] = set()  # installed buckets that have not run yet
        self._install_lock = threading.Lock()
        self.startup = StartupReport()
        self.compiling: threading.Thread | None = None  # larger buckets still compiling (set by the bootstrap)
        self.state = allocate_state(mesh, self.data, slots, model.config.vocab_size)  # donated to each step
        self.penalty_rows = RowSetter(mesh, self.data, slots, model.config.vocab_size)
        self._abstract_args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            (model.params, self.cache, self.state),
        )
        self._place_per_process = jax.process_count() > 1  # the mesh spans processes (`_to_device`)
        self.replicas = None  # multi-host leader: told each device call first (`jaxinfer.multihost.replica`)
        self._streams: dict[str, OutputStream] = {}
        self._pending: PendingStep | None = None  # the dispatched step, read back after the next is dispatched
        self._steps = 0
        self._steps_by_bucket: collections.Counter = collections.Counter()
        self._finished: collections.Counter = collections.Counter()
        self._compiles_at_warmup: int | None = None
        log.info(
            "KV cache: %d pages/shard x %d shards of %d tokens = %.1f MiB; %d slots; buckets %s; attention %s; "
            "prefix cache %s",
            self.cache_shape.pages_per_shard,
            self.data,
            config.page_size,
            self.cache_shape.total_bytes / 2**20,
            config.max_slots,
            self.buckets,
            self.platform.attention,
            "on" if config.prefix_cache else "off",
        )

    def _resolve_pages(self, one_page: CacheShape, pages_per_slot: int) -> int:
        c, m = self.config, self.model
        if c.kv_pages is not None:
            if c.kv_pages < pages_per_slot:
                raise ConfigError(
                    f"--kv-pages {c.kv_pages} is below the {pages_per_slot} pages one "
                    f"request of --max-context {c.max_context} needs"
                )
            return c.kv_pages
        if c.kv_memory_fraction is None:
            return (c.max_slots // self.data) * pages_per_slot
        try:
            limit, in_use = device_memory(local_device(m.mesh.devices.flat))
        except ValueError as e:
            raise ConfigError(f"--kv-memory-fraction: {e}; use --kv-pages instead") from None
        if in_use is None:  # host devices: what this engine put there so far is its weights
            in_use = per_device_bytes(m.params)
        pages = pages_for_memory_fraction(limit, c.kv_memory_fraction, in_use, one_page, m.mesh.shape["tensor"])
        if pages < pages_per_slot:
            raise ConfigError(
                f"--kv-memory-fraction {c.kv_memory_fraction} leaves room for {pages} pages, "
                f"below the {pages_per_slot} one request needs"
            )
        return pages

    # ---- compiled steps ----------------------------------------------------------------------
    def lower(self, bucket: int):
        """Traces and lowers the step of `bucket` from abstract arguments (safe on any thread)."""
        params, cache, state = self._abstract_args
        return self._step_fn.lower(params, cache, abstract_inputs(self.inputs, self.model.mesh, bucket), state)

    def compile(self, buckets) -> dict:
        """{bucket: executable} for `buckets`: each traced and handed to a thread pool that compiles it
        while the next is traced; the time and counts go into `self.startup`."""
        report = self.startup
        hits = compile_counter.cache_hits()
        compiled, trace_s, compile_s = compile_pipelined(self.lower, buckets)
        report.trace_s += trace_s
        report.compiled += len(compiled)
        report.compile_s += compile_s
        report.cache_hits += compile_counter.cache_hits() - hits
        return compiled

    def install(self, executables: dict, proven: bool = False) -> None:
        """Makes compiled or loaded executables available to the next step (callable from any thread).
        Unless `proven` (loaded from disk), each is run once on idle inputs when the engine is idle
        (`warm_one`), so its first-run work (on CPU, oneDNN's kernel generation) does not land on a request."""
        with self._install_lock:
            self._arrived.update(executables)
            if not proven:
                self._unproven.update(executables)

    @property
    def unproven_buckets(self) -> tuple[int, ...]:
        with self._install_lock:
            return tuple(sorted(self._unproven))

    def warm_one(self) -> bool:
        """Runs the smallest installed bucket that has never run, if the engine is idle; True if it ran one."""
        if self.has_work() or not self.unproven_buckets:
            return False
        self.run_idle(self.unproven_buckets[:1])
        return True

    @property
    def ready_buckets(self) -> tuple[int, ...]:
        with self._install_lock:
            return tuple(sorted(set(self._executables) | set(self._arrived)))

    def run_idle(self, buckets) -> None:
        """Runs each of `buckets` once on idle inputs (a first run of a freshly compiled executable)."""
        self._take_installed()
        start = time.perf_counter()
        for bucket in buckets:
            self._ran(bucket)
            step = self._executable(bucket)
            inputs = self._to_device(self.inputs.empty(bucket))
            with self._replicated("idle", bucket=bucket):
                outputs, self.cache, self.state = step(self.model.params, self.cache, inputs, self.state)
            outputs.samples.tokens.block_until_ready()
        self.startup.run_s += time.perf_counter() - start

    def mark_warm(self) -> None:
        """From now on every compilation counts as a recompile (and fails with --strict-no-recompile)."""
        if not self.penalty_rows.ready:  # first needed by a request: compiled now unless start-up loaded it
            self.penalty_rows.install(self.penalty_rows.compile())
        self._compiles_at_warmup = compile_counter.count()

    # ---- facade ------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compiles every bucket not yet installed (concurrently), runs each new one once on idle inputs,
        and marks the engine warm; returns seconds taken."""
        start = time.perf_counter()
        missing = [b for b in self.buckets if b not in self.ready_buckets]
        self.install(self.compile(missing))
        self.run_idle(self.unproven_buckets)
        self.mark_warm()
        return time.perf_counter() - start

    @property
    def compilations_after_warmup(self) -> int:
        if self._compiles_at_warmup is None:
            return 0
        return compile_counter.count() - self._compiles_at_warmup

    def submit(self, request: Request) -> None:
        """Queues a request that the request builder validated. One without a seed gets one from the
        OS, reported in its result, so a sampled output can always be reproduced."""
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(32)
        eos = tuple(self.model.config.eos_token_ids if self.tokenizer is None else self.tokenizer.eos_ids)
        seq = Sequence(request, seed)
        self._streams[request.id] = OutputStream(seq, self.tokenizer, eos, self.config.max_context)
        self.scheduler.add(seq)

    def cancel(self, request_id: str) -> Result | None:
        """Ends a request now; its slot and pages are free for the next step. None if not in flight."""
        seq = self.scheduler.find(request_id)
        return self._finish(seq, "cancelled") if seq is not None else None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def step(self) -> list[Event]:
        """Dispatches one step (if there is work) and returns the events of the step before it."""
        dispatched = self._dispatch()
        events = self._collect(self._pending) if self._pending is not None else []
        self._pending = dispatched
        if self.config.strict_no_recompile and self.compilations_after_warmup:
            raise compile_counter.RecompileError(
                f"{self.compilations_after_warmup} XLA compilation(s) after warm-up (--strict-no-recompile)"
            )
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

    def status(self) -> EngineStatus:
        s = self.scheduler
        return EngineStatus(
            active_slots=len(s.running()),
            waiting=len(s.waiting),
            prefilling=sum(q.num_computed < len(q.request.prompt_ids) for q in list(s.waiting) + s.running()),
            pages_used=s.pages_used,
            pages_cached=s.pages_cached,
            pages_total=s.pages_total,
            steps=self._steps,
            preemptions=s.preemptions,
            compilations_after_warmup=self.compilations_after_warmup,
            steps_by_bucket=dict(self._steps_by_bucket),
            finished=dict(self._finished),
            buckets_ready=self.ready_buckets,
            prefix_lookup_tokens=s.prefix.stats.lookup_tokens,
            prefix_hit_tokens=s.prefix.stats.hit_tokens,
            prompt_tokens_computed=s.prefix.stats.prompt_tokens_computed,
            prefix_evictions=s.prefix.evictions,
        )

    # ---- internals ---------------------------------------------------------------------------
    def _ran(self, bucket: int) -> None:
        """`bucket` has run once now (its first-run work is done)."""
        if bucket in self._unproven:  # unlocked read: once proven, a bucket never becomes unproven again
            with self._install_lock:
                self._unproven.discard(bucket)

    def _take_installed(self) -> None:
        with self._install_lock:
            arrived, self._arrived = self._arrived, {}
        if arrived:
            self._executables.update(arrived)
            self.scheduler.use_buckets(tuple(sorted(self._executables)))

    def _dispatch(self):
        if not self._executables and not self._arrived:
            self.warmup()  # nothing compiled yet: compile everything now, before the first step
        self._take_installed()
        plan: StepPlan | None = self.scheduler.schedule()
        self._write_penalty_rows()
        if plan is None:
            return None
        host = self.inputs.build(plan)
        self._ran(plan.bucket)  # if it never ran, this real step is its first run
        with self._replicated("step", host, bucket=plan.bucket):
            outputs = self._run_step(plan.bucket, host)
        self._steps_by_bucket[plan.bucket] += 1
        return pending_step(outputs, plan)

    def _run_step(self, bucket: int, host: dict):
        step = self._executable(bucket)
        outputs, self.cache, self.state = step(self.model.params, self.cache, self._to_device(host), self.state)
        self._steps += 1
        return outputs

    def _executable(self, bucket: int):
        """The compiled step of `bucket`; on a multi-host worker, one still compiling in the background is
        waited for (the leader only uses buckets it has, and every process compiles the same ones)."""
        if bucket not in self._executables:
            self._take_installed()
            if bucket not in self._executables and self.compiling is not None:
                self.compiling.join()
                self._take_installed()
        return self._executables[bucket]

    # ---- multi-host workers: the leader's device calls, repeated (`jaxinfer.multihost.replica`) ----
    def replay_step(self, bucket: int, host: dict) -> None:
        self._ran(bucket)
        self._run_step(bucket, host)

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

    def _to_device(self, host: dict) -> StepInputs:
        if self._place_per_process:
            # each process holds the same host arrays and places only its own devices' slices: device_put
            # into a mesh that spans processes would compile and run a cross-process equality check
            put = lambda a, sharding: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
            return StepInputs.from_flat({k: put(a, self._input_shardings[k]) for k, a in host.items()})
        # one batched transfer per step: per-array device_put calls cost the host (and on CPU the
        # device's) time every step
        return StepInputs.from_flat(jax.device_put(host, self._input_shardings))

    def _collect(self, pending: PendingStep) -> list[Event]:
        read_prompt_logprobs(pending, self._streams)
        events = []
        for seq, token, logprob, top in read_samples(pending):
            self.scheduler.accept(seq, [token])
            if seq.finished:
                continue
            event, reason = self._streams[seq.id].add(token, logprob, top)
            if reason is not None:
                event.result = self._finish(seq, reason)
            events.append(event)
        return events

    def _finish(self, seq: Sequence, reason: str) -> Result:
        self.scheduler.finish(seq, reason)
        self._finished[reason] += 1
        return self._streams.pop(seq.id).result(reason)
