"""A dispatched step on its way back to the host: which of its outputs to read, and where they go.

Tokens and their logprobs are read after every step. The top alternatives and the prompt logprobs
([D, T, 20] each) are read only when a request in that step asked for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.engine.scheduler import Sequence, StepPlan
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
class PendingStep:
    outputs: object  # StepOutputs on device
    sampled: list[Sequence]  # sequences that sample in this step
    prompt_chunks: list[PromptChunk]  # chunks whose request wants prompt logprobs


def pending_step(outputs, plan: StepPlan) -> PendingStep:
    sampled = [c.seq for c in plan.chunks if c.samples]
    prompt = []
    for d, chunks in enumerate(plan.shards):
        ordered = in_slot_order(chunks)
        for chunk, first in zip(ordered, first_tokens(ordered)):
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
    """-> per sampled sequence (token, logprob, top pairs or None), in `pending.sampled` order."""
    samples = pending.outputs.samples
    tokens, logprobs = np.asarray(samples.tokens), np.asarray(samples.logprobs)
    wants_top = any(seq.request.params.top_logprobs for seq in pending.sampled)
    ids, top = (np.asarray(samples.top_ids), np.asarray(samples.top_logprobs)) if wants_top else (None, None)
    for seq in pending.sampled:
        d, s = seq.shard, seq.slot
        pairs = top_pairs(ids[d, s], top[d, s]) if seq.request.params.top_logprobs else None
        yield seq, int(tokens[d, s]), float(logprobs[d, s]), pairs
