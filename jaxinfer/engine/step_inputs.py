"""A step's inputs: the `StepInputs` pytree the jitted step takes, and the host builder that fills it
from a `StepPlan`. The engine, warm-up and AOT compilation all build their arrays here, so the
compiled signatures are exactly the ones the engine runs.

Per data shard, a step carries up to `bucket` tokens laid out slot by slot. Tokens of decoding
slots come from the previous step's samples on device (`use_prev`), so the host can dispatch step
n+1 before it has read step n's tokens back.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.engine.scheduler import StepPlan
from jaxinfer.engine.step_registry import key_bucket
from jaxinfer.sampling import SamplingArrays


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Arrays of one step. D = data shards, T = token bucket, S = slots per shard, W = pages per slot."""

    tokens: jax.Array  # i32 [D, T] prompt tokens (ignored where use_prev)
    use_prev: jax.Array  # bool [D, T] take the token the previous step sampled for prev_slot
    prev_slot: jax.Array  # i32 [D, T]
    positions: jax.Array  # i32 [D, T] absolute positions; -1 for padding
    write_page: jax.Array  # i32 [D, T] shard-local page receiving this token's K/V; out of range = drop
    write_offset: jax.Array  # i32 [D, T]
    kv_lens: jax.Array  # i32 [D, S] tokens in cache per slot after this step's writes
    page_indices: jax.Array  # i32 [D, S, W] shard-local page tables
    cu_q_lens: jax.Array  # i32 [D, S + 1]
    num_seqs: jax.Array  # i32 [D, 1]
    sample_index: jax.Array  # i32 [D, S] token whose logits are sampled for each slot (its window's offset 0)
    # Only tokens that sample reach the vocabulary head and the sampler: at most R = min(T, S) slots
    # sample in a step, so a one-token step with 32 slots projects and samples one row, not 32 (the
    # head is the largest matmul of a small model, and sampling reads every row's whole vocabulary).
    logit_rows: jax.Array  # i32 [D, R] the sampling slots' tokens, in slot order (0 past the last)
    logit_slot: jax.Array  # i32 [D, R] the slot of each logit row (-1 past the last)
    logit_map: jax.Array  # i32 [D, S] each slot's logit row (0 for a slot that does not sample)
    prompt_targets: jax.Array  # i32 [D, T] the prompt token after each token, for prompt logprobs; -1 = none
    sampling: SamplingArrays  # each field [D, S]
    # speculation (`jaxinfer.engine.verify`): E extra sample rows (0 in a plain step), K proposals per window
    extra_index: jax.Array  # i32 [D, E] token whose logits each extra row samples
    extra_slot: jax.Array  # i32 [D, E] the slot an extra row belongs to
    extra_offset: jax.Array  # i32 [D, E] its window offset (>= 1)
    window_rows: jax.Array  # i32 [D, S, K + 1] the sample row of each window offset; -1 = none
    window_proposals: jax.Array  # i32 [D, S, K] the proposals the window verifies; -1 = none
    propose: jax.Array  # bool [D, S] the draft proposes this slot's next window
    follow: jax.Array  # bool [D, 1] the draft runs over this step's tokens

    @classmethod
    def from_flat(cls, arrays: dict) -> StepInputs:
        """From one flat dict holding every field, the sampling ones included (as `HostBatchBuilder` builds)."""
        sampling_keys = [f.name for f in dataclasses.fields(SamplingArrays)]
        return cls(
            **{k: v for k, v in arrays.items() if k not in sampling_keys},
            sampling=SamplingArrays(**{k: arrays[k] for k in sampling_keys}),
        )


def in_slot_order(chunks):
    return sorted(chunks, key=lambda c: c.seq.slot)


@dataclasses.dataclass(frozen=True)
class HostBatchBuilder:
    """Builds one step's host (numpy) arrays; shapes depend only on these sizes and the bucket."""

    data_shards: int
    slots_per_shard: int
    pages_per_slot: int
    pages_per_shard: int
    page_size: int
    proposals: int = 0  # K: tokens a verify window proposes (0: no speculation)

    def extra_rows(self, bucket: int) -> int:
        """E of the verify step of `bucket`: every token but one speculating slot's first may be a proposal."""
        return min(bucket - 1, self.slots_per_shard * self.proposals)

    def idle(self, key) -> dict[str, np.ndarray]:
        """The idle inputs of step `key`: a bucket's plain step, or its verify variant (`step_registry`)."""
        bucket = key_bucket(key)
        return self.empty(bucket, self.extra_rows(bucket) if isinstance(key, str) else 0)

    def empty(self, bucket: int, extra_rows: int = 0) -> dict[str, np.ndarray]:
        """An idle step: no tokens, every write dropped (what warm-up runs and AOT compiles)."""
        d, s, w, k, e = self.data_shards, self.slots_per_shard, self.pages_per_slot, self.proposals, extra_rows
        sampled = min(bucket, s)  # the most slots that can sample in a step of `bucket` tokens
        return dict(
            tokens=np.zeros((d, bucket), np.int32),
            use_prev=np.zeros((d, bucket), bool),
            prev_slot=np.zeros((d, bucket), np.int32),
            positions=np.full((d, bucket), -1, np.int32),
            write_page=np.full((d, bucket), self.pages_per_shard, np.int32),
            write_offset=np.zeros((d, bucket), np.int32),
            kv_lens=np.zeros((d, s), np.int32),
            page_indices=np.zeros((d, s, w), np.int32),
            cu_q_lens=np.zeros((d, s + 1), np.int32),
            num_seqs=np.full((d, 1), s, np.int32),
            sample_index=np.zeros((d, s), np.int32),
            logit_rows=np.zeros((d, sampled), np.int32),
            logit_slot=np.full((d, sampled), -1, np.int32),
            logit_map=np.zeros((d, s), np.int32),
            prompt_targets=np.full((d, bucket), -1, np.int32),
            **{name: a.reshape(d, s) for name, a in vars(SamplingArrays.neutral(d * s)).items()},
            extra_index=np.zeros((d, e), np.int32),
            extra_slot=np.zeros((d, e), np.int32),
            extra_offset=np.zeros((d, e), np.int32),
            window_rows=np.full((d, s, k + 1), -1, np.int32),
            window_proposals=np.full((d, s, k), -1, np.int32),
            propose=np.zeros((d, s), bool),
            follow=np.zeros((d, 1), bool),
        )

    def build(self, plan: StepPlan) -> dict[str, np.ndarray]:
        """The arrays of `plan`, with a few numpy ops per shard (a Python loop over slots and tokens costs
        milliseconds of host time per step at batch 32, taken from the device's cores on CPU)."""
        host = self.empty(plan.bucket, self.extra_rows(plan.bucket) if plan.verifies else 0)
        host["follow"][:] = plan.follow
        for d, chunks in enumerate(plan.shards):
            if chunks:  # a shard with no tokens keeps cu_q_lens all zero
                self._fill_shard(host, d, in_slot_order(chunks))
        return host

    def _fill_shard(self, host: dict, d: int, chunks) -> None:
        page = self.page_size
        seqs = [c.seq for c in chunks]
        slots = np.array([seq.slot for seq in seqs], np.int32)
        starts = np.array([c.start for c in chunks], np.int32)
        counts = np.array([c.count for c in chunks], np.int32)
        known = np.array([seq.known for seq in seqs], np.int32)
        first = np.array(first_tokens(chunks), np.int32)
        proposed = np.array([len(c.proposals) for c in chunks], np.int32)
        n = int(counts.sum())
        by_slot = np.zeros(self.slots_per_shard, np.int32)
        by_slot[slots] = counts
        host["cu_q_lens"][d, 1:] = np.cumsum(by_slot)
        entry = np.repeat(np.arange(len(chunks)), counts)
        pos = starts[entry] + np.arange(n, dtype=np.int32) - first[entry]
        for c, f in zip(chunks, first.tolist()):
            host["page_indices"][d, c.seq.slot, : len(c.seq.pages)] = c.seq.pages
            have = c.seq.known_tokens(c.start, c.start + c.count - len(c.proposals))
            host["tokens"][d, f : f + len(have)] = have  # the rest come from the previous step's samples
            host["tokens"][d, f + c.count - len(c.proposals) : f + c.count] = c.proposals
            if c.seq.request.params.prompt_logprobs is not None:
                prompt = c.seq.request.prompt_ids
                targets = prompt[c.start + 1 : min(c.start + c.count + 1, len(prompt))]
                host["prompt_targets"][d, f : f + len(targets)] = targets
        host["use_prev"][d, :n] = (pos >= known[entry]) & (pos < (starts + counts - proposed)[entry])
        host["prev_slot"][d, :n] = slots[entry]
        host["positions"][d, :n] = pos
        host["write_page"][d, :n] = host["page_indices"][d, slots[entry], pos // page]
        host["write_offset"][d, :n] = pos % page
        host["kv_lens"][d, slots] = starts + counts
        done = [e for e, c in enumerate(chunks) if c.samples]
        if not done:
            return
        at = slots[done]
        params = [seqs[e].request.params for e in done]
        host["sample_index"][d, at] = first[done] + counts[done] - 1 - proposed[done]
        host["logit_rows"][d, : len(done)] = host["sample_index"][d, at]
        host["logit_slot"][d, : len(done)] = at
        host["logit_map"][d, at] = np.arange(len(done), dtype=np.int32)
        host["window_rows"][d, at, 0] = at
        host["propose"][d, at] = [chunks[e].propose for e in done]
        self._fill_windows(host, d, [chunks[e] for e in done], first[done])
        host["temperature"][d, at] = [p.temperature for p in params]
        host["top_k"][d, at] = [p.top_k for p in params]
        host["top_p"][d, at] = [p.top_p for p in params]
        host["min_p"][d, at] = [p.min_p for p in params]
        host["seed"][d, at] = [seqs[e].seed for e in done]
        host["position"][d, at] = starts[done] + counts[done] - proposed[done]
        host["logprobs"][d, at] = [p.logprobs for p in params]
        host["top_logprobs"][d, at] = [p.top_logprobs for p in params]
        host["penalized"][d, at] = [p.penalized for p in params]
        host["presence"][d, at] = [p.presence_penalty for p in params]
        host["frequency"][d, at] = [p.frequency_penalty for p in params]
        host["repetition"][d, at] = [p.repetition_penalty for p in params]

    def _fill_windows(self, host: dict, d: int, chunks, first) -> None:
        """The extra sample rows and window tables of the shard's verify windows."""
        row = 0
        for c, f in zip(chunks, first.tolist()):
            k = len(c.proposals)
            if not k:
                continue
            rows = np.arange(row, row + k)
            offsets = np.arange(1, k + 1, dtype=np.int32)
            host["extra_index"][d, rows] = f + offsets
            host["extra_slot"][d, rows] = c.seq.slot
            host["extra_offset"][d, rows] = offsets
            host["window_rows"][d, c.seq.slot, 1 : k + 1] = self.slots_per_shard + rows
            host["window_proposals"][d, c.seq.slot, :k] = c.proposals
            row += k


def first_tokens(chunks) -> list[int]:
    """Where each of one shard's chunks (in slot order, as the step lays them out) starts in the step."""
    return np.concatenate([[0], np.cumsum([c.count for c in chunks])[:-1]]).astype(int).tolist()
