"""A dispatched step on its way back to the host: which of its outputs to read, and where they go.

Tokens and their logprobs are read after every step. The top alternatives and the prompt logprobs
([D, T, 20] each) are read only when a request in that step asked for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.engine.scheduler import Chunk, Sequence, StepPlan
from jaxinfer.engine.step_inputs import first_tokens, in_slot_order


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """`count` tokens of `seq` from position `start` ran from token `first` of data shard `shard`."""

    seq: Sequence
    shard: int
    first: int
    start: int
    count: int


@dataclasses.dataclass(frozen=True)
class SampledChunk:
    """A chunk that samples: the sample rows of its window offsets in its shard (one unless it verifies)."""

    chunk: Chunk
    shard: int
    rows: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PendingStep:
    outputs: object  # StepOutputs on device
    sampled_chunks: list[SampledChunk]
    prompt_chunks: list[PromptChunk]  # chunks whose request wants prompt logprobs

    @property
    def needs_readback(self) -> bool:
        """A sequence of this step verifies, proposes or will speculate: its next step needs its tokens."""
        return any(c.chunk.proposals or c.chunk.propose or c.chunk.seq.speculate for c in self.sampled_chunks)

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that sample in this step."""
        return [c.chunk.seq for c in self.sampled_chunks]


@dataclasses.dataclass(frozen=True)
class Window:
    """What one sampling chunk produced, read back: the tokens it keeps and their figures."""

    seq: Sequence
    sampled: int  # samples the step drew for it (1 + its proposals)
    proposed: int
    tokens: list[int]  # the accepted proposals' samples and the one after them
    logprobs: list[float]
    top: list | None  # per token, (token, logprob) pairs when the request asked
    draft_proposals: list[int]  # the draft's proposals for its next window (when it proposed)


def pending_step(outputs, plan: StepPlan, slots_per_shard: int) -> PendingStep:
    """Rows as `HostBatchBuilder` lays them out: slot s samples row s first, then the shard's verify
    windows take rows S, S+1, ... in slot order."""
    sampled, prompt = [], []
    for d, chunks in enumerate(plan.shards):
        ordered = in_slot_order(chunks)
        extra = slots_per_shard
        for chunk, first in zip(ordered, first_tokens(ordered)):
            if chunk.samples:
                k = len(chunk.proposals)
                sampled.append(SampledChunk(chunk, d, (chunk.seq.slot,) + tuple(range(extra, extra + k))))
                extra += k
            if chunk.seq.request.params.prompt_logprobs is not None:
                prompt.append(PromptChunk(chunk.seq, d, first, chunk.start, chunk.count))
    return PendingStep(outputs, sampled, prompt)


def top_pairs(ids: np.ndarray, logprobs: np.ndarray) -> list[tuple[int, float]]:
    return list(zip(ids.tolist(), logprobs.tolist()))


def read_prompt_logprobs(pending: PendingStep, streams: dict) -> None:
    """Hands each prompt-logprob chunk's values to its request's output stream (if still in flight)."""
    if not pending.prompt_chunks:
        return
    prompt = pending.outputs.prompt
    logprobs, ids, top = np.asarray(prompt.logprobs), np.asarray(prompt.top_ids), np.asarray(prompt.top_logprobs)
    for c in pending.prompt_chunks:
        stream = streams.get(c.seq.id)
        if stream is None or stream.seq is not c.seq:
            continue
        for i in range(min(c.count, len(c.seq.request.prompt_ids) - 1 - c.start)):
            at = c.first + i
            stream.add_prompt_logprob(
                c.start + i + 1, float(logprobs[c.shard, at]), top_pairs(ids[c.shard, at], top[c.shard, at])
            )


def read_samples(pending: PendingStep):
    """-> a `Window` per sampling chunk, in `pending.sampled` order."""
    out = pending.outputs
    samples = out.samples
    tokens, logprobs = np.asarray(samples.tokens), np.asarray(samples.logprobs)
    wants_top = any(seq.request.params.top_logprobs for seq in pending.sampled)
    ids, top = (np.asarray(samples.top_ids), np.asarray(samples.top_logprobs)) if wants_top else (None, None)
    verifies = any(c.chunk.proposals for c in pending.sampled_chunks)
    accepted = np.asarray(out.accepted) if verifies else None
    proposes = any(c.chunk.propose for c in pending.sampled_chunks)
    proposals = np.asarray(out.proposals) if proposes else None
    for sampled in pending.sampled_chunks:
        chunk, d = sampled.chunk, sampled.shard
        seq = chunk.seq
        a = int(accepted[d, seq.slot]) if chunk.proposals else 0
        keep = sampled.rows[: 1 + a]
        wants = seq.request.params.top_logprobs
        yield Window(
            seq=seq,
            sampled=chunk.samples,
            proposed=len(chunk.proposals),
            tokens=list(chunk.proposals[:a]) + [int(tokens[d, keep[-1]])],  # the accepted, then the target's
            logprobs=[float(logprobs[d, r]) for r in keep],
            top=[top_pairs(ids[d, r], top[d, r]) for r in keep] if wants else None,
            draft_proposals=proposals[d, seq.slot].tolist() if chunk.propose else [],
        )
