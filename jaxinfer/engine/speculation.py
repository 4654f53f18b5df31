"""Speculative decoding on the host: where proposals come from, whether each slot speculates, and the
figures (`--speculative ngram|draft`, `--num-speculative-tokens K`).

Proposals: `ngram` looks them up in the sequence's own tokens (`jaxinfer.engine.ngram`); `draft`
takes the K greedy tokens the draft model proposed for the slot in its previous step
(`jaxinfer.engine.draft_step`). Verification is on device and exact (`jaxinfer.engine.verify`).

Adaptive (`decide`, before every step), in two parts:
  1. A prediction. A speculating slot costs its window's extra tokens in the step and gives up the
     overlap of host and device for its steps. For each candidate slot the expected tokens of a
     window of n proposals are 1 + a + a^2 + ... + a^n, with a its per-token acceptance rate so far
     (accepted / (accepted + rejections), shrunk towards the engine's rate, which starts at 1/2).
     Step times are measured per bucket as the engine runs (`StepTimes`). Slots join the speculating
     set in order of their expected gain while the predicted tokens per second of the whole step
     improve on the step without them. So at a large batch, where the window's tokens make the
     step slower than they give back, speculation is not even tried.
  2. A measurement that overrules it. Output tokens per second are measured per batch size class
     (decoding slots, by powers of two) for steps with and without verify windows (`ModeRates`).
     Where both are known and speculating measured slower, it is off; it is tried again for
     PROBE_STEPS steps after PROBE_BACKOFF steps, then twice as many, and so on. Where speculating was measured but
     decoding without it was not, a few steps run without it first.
An n-gram slot that is not speculating still has its proposals checked against the tokens that
actually came (free on the host), so its rate stays current; a draft slot's rate decays towards the
engine's after PROBE_AFTER steps off, so it is tried again.
Penalized requests never speculate: their penalties change with every token of a window.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxinfer.engine.ngram import index_for

PRIOR_WEIGHT = 4.0  # proposals' worth of the engine-wide rate in each slot's estimate
PROBE_AFTER = 16  # steps off after which a draft slot's history is halved
TIME_DECAY = 0.2  # weight of a new step time in its running average
MIN_SAMPLES = 4  # steps measured in a mode before its rate is trusted
PROBE_STEPS = 2  # steps of a re-measurement of speculation where it measured slower
PROBE_BACKOFF = 64  # steps before a losing mode is measured again (doubles each time it loses again)
PROBE_BACKOFF_MAX = 4096


@dataclasses.dataclass
class SpeculationStats:
    proposed: int = 0  # proposals verified
    accepted: int = 0  # of those, accepted
    windows: int = 0  # verify windows run
    shadow_proposed: int = 0  # n-gram proposals checked against tokens decoded without speculating
    shadow_accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class StepTimes:
    """Running averages of seconds per step by (verify, bucket), measured between dispatches."""

    def __init__(self):
        self.seconds: dict[tuple[bool, int], float] = {}

    def record(self, verify: bool, bucket: int, seconds: float) -> None:
        old = self.seconds.get((verify, bucket))
        self.seconds[(verify, bucket)] = seconds if old is None else old + TIME_DECAY * (seconds - old)

    def estimate(self, verify: bool, bucket: int) -> float | None:
        """The measured time, else the other variant's of the bucket, else the nearest larger bucket's
        (optimistic: a step shape is tried, then measured); None when nothing is measured yet."""
        for key in ((verify, bucket), (not verify, bucket)):
            if key in self.seconds:
                return self.seconds[key]
        larger = sorted((b, s) for (_, b), s in self.seconds.items() if b >= bucket)
        smaller = sorted((b, s) for (_, b), s in self.seconds.items() if b < bucket)
        return larger[0][1] if larger else (smaller[-1][1] if smaller else None)


class ModeRates:
    """Measured output tokens per second of steps with (`on`) and without verify windows, per batch class."""

    def __init__(self):
        self.rate: dict[tuple[int, bool], float] = {}
        self.samples: collections.Counter = collections.Counter()

    def record(self, decoding: int, on: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        key = (decoding.bit_length(), on)
        value, old = tokens / seconds, self.rate.get(key)
        self.rate[key] = value if old is None else old + TIME_DECAY * (value - old)
        self.samples[key] += 1

    def trusted(self, decoding: int, on: bool) -> float | None:
        key = (decoding.bit_length(), on)
        return self.rate[key] if self.samples[key] >= MIN_SAMPLES else None


class Speculation:
    def __init__(
        self,
        mode: str,
        tokens: int,
        buckets: tuple[int, ...],
        data_shards: int,
        adaptive: bool = True,
        draft_cache: bool = True,
    ):
        self.mode, self.tokens, self.buckets, self.data = mode, tokens, buckets, data_shards
        self.adaptive = adaptive
        # a draft model keeps a cache that steps must follow; a feature head (`head_step`) keeps none
        self.draft_cache = draft_cache and mode == "draft"
        self.following = True  # draft: whether steps run the draft over their tokens (see `decide`)
        self._engine_history = (0, 0)  # (proposals tried one by one, accepted) over all slots
        self.stats = SpeculationStats()
        self.times = StepTimes()
        self.rates = ModeRates()
        self._probe_at: dict[int, int] = {}  # batch class -> decide() count when speculation is tried again
        self._backoff: dict[int, int] = {}
        self._decisions = 0
        self._off_steps: collections.Counter = collections.Counter()

    @property
    def uses_draft(self) -> bool:
        return self.mode == "draft"

    # ---- proposals ------------------------------------------------------------------------------
    def proposer(self, seq, limit: int) -> list[int]:
        """The scheduler's source of a speculating sequence's proposals (at most `limit`)."""
        limit = min(limit, self.tokens)
        if self.mode == "ngram":
            return index_for(seq).propose(limit)
        proposals, seq.draft_proposals = seq.draft_proposals[:limit], []
        return proposals

    def record(self, seq, proposed: int, accepted: int) -> None:
        """A verify window of `seq` ran: `accepted` of its `proposed` proposals were kept."""
        seq.proposed += proposed
        seq.accepted += accepted
        _learn(seq, proposed, accepted)
        self._engine_history = (
            self._engine_history[0] + _trials(proposed, accepted),
            self._engine_history[1] + accepted,
        )
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.windows += 1

    # ---- adaptive -------------------------------------------------------------------------------
    def rate(self, seq) -> float:
        engine = (self._engine_history[1] + 1) / (self._engine_history[0] + 2)
        seen, hits = seq.history
        return (hits + PRIOR_WEIGHT * engine) / (seen + PRIOR_WEIGHT)

    def decide(self, running) -> None:
        """Sets `speculate` on each running sequence for its next steps (see the module docstring)."""
        decoding = [s for s in running if not s.finished and s.num_computed >= len(s.request.prompt_ids)]
        for seq in running:
            self._shadow(seq)
        candidates = []
        for seq in decoding:
            n = self._expected_proposals(seq)
            if n and not seq.request.params.penalized:
                a = self.rate(seq)
                candidates.append((sum(a**i for i in range(1, n + 1)), n, seq))
        candidates.sort(key=lambda c: -c[0] / c[1])
        if self.adaptive:
            candidates = self._paying(candidates, len(decoding))
            if candidates and not self._measured_to_pay(len(decoding)):
                candidates = []
        # the draft keeps following while speculation pays for someone; a slot it fell behind on stays off
        self.following = self.draft_cache and (bool(candidates) or not decoding)
        on = {id(c[2]) for c in candidates if not self.draft_cache or c[2].draft_valid >= c[2].num_computed}
        for seq in decoding:
            seq.speculate = id(seq) in on
            self._off_steps[seq.id] = 0 if seq.speculate else self._off_steps[seq.id] + 1
            if self.uses_draft and self._off_steps[seq.id] >= PROBE_AFTER:
                seen, hits = seq.history
                seq.history, self._off_steps[seq.id] = (seen // 2, hits // 2), 0

    def _measured_to_pay(self, decoding: int) -> bool:
        """Part 2 of the module docstring: whether the measured rates let a predicted gain be tried."""
        self._decisions += 1
        cls = decoding.bit_length()
        on, off = self.rates.trusted(decoding, True), self.rates.trusted(decoding, False)
        if on is None:
            return True  # not measured yet: try it
        if off is None:
            return False  # measure decoding without it too
        if on >= off:
            self._backoff.pop(cls, None)
            return True
        if self._decisions < self._probe_at.get(cls, 0):
            return False
        if cls in self._probe_at and self._decisions < self._probe_at[cls] + PROBE_STEPS:
            return True  # probing
        self._backoff[cls] = min(2 * self._backoff.get(cls, PROBE_BACKOFF // 2), PROBE_BACKOFF_MAX)
        self._probe_at[cls] = self._decisions + self._backoff[cls]
        return False

    def _paying(self, candidates, decoding: int) -> list:
        """The candidates (best first) whose speculation raises the predicted tokens per second."""
        tokens = max(decoding, 1)
        best_rate, chosen = self._throughput(tokens, tokens, verify=False), 0
        gained = extra = 0.0
        for i, (gain, n, _) in enumerate(candidates):
            gained, extra = gained + gain, extra + n
            rate = self._throughput(tokens + gained, tokens + extra, verify=True)
            if rate is None or best_rate is None or rate > best_rate:
                best_rate, chosen = rate, i + 1
        return candidates[:chosen]

    def _expected_proposals(self, seq) -> int:
        if self.mode == "draft":
            return self.tokens
        return len(index_for(seq).propose(self.tokens))

    def _throughput(self, produced: float, tokens: float, verify: bool) -> float | None:
        per_shard = -(-int(tokens) // self.data)
        bucket = next((b for b in self.buckets if b >= per_shard), self.buckets[-1])
        seconds = self.times.estimate(verify, bucket)
        return None if not seconds else produced / seconds

    def _shadow(self, seq) -> None:
        """n-gram only: scores what the index would have proposed against the tokens that came."""
        if self.mode != "ngram" or seq.speculate:
            seq.shadow = None
            return
        pending = seq.shadow
        if pending is not None:
            at, proposals = pending
            came = seq.known_tokens(at, at + len(proposals)) if seq.known >= at + len(proposals) else None
            if came is None:
                return
            hits = 0
            for want, got in zip(proposals, came):
                if want != got:
                    break
                hits += 1
            _learn(seq, len(proposals), hits)
            seen, got = self._engine_history
            self._engine_history = (seen + _trials(len(proposals), hits), got + hits)
            self.stats.shadow_proposed += len(proposals)
            self.stats.shadow_accepted += hits
        proposals = index_for(seq).propose(self.tokens)
        seq.shadow = (seq.known, proposals) if proposals else None


def _trials(proposed: int, accepted: int) -> int:
    """Proposals that were tried one by one: a window stops at its first rejection, so the per-token
    acceptance rate is accepted / (accepted + rejections), not accepted / proposed."""
    return accepted + (accepted < proposed)


def _learn(seq, proposed: int, accepted: int) -> None:
    """Adds to the history `rate` estimates from (verified, or checked in the shadow)."""
    seen, hits = seq.history
    seq.history = (seen + _trials(proposed, accepted), hits + accepted)
