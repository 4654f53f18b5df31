"""Speculative decoding: outputs equal decoding without it (greedy and seeded sampling, n-gram and draft
proposers, both meshes, under preemption), the sampled distribution is the model's (chi-square on a
tiny vocabulary, where a wrong acceptance rule fails), the adaptive policy, and the refusals."""

import dataclasses
import json
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinfer import run
from jaxinfer.config import get_preset
from jaxinfer.engine import engine as engine_module
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.ngram import NgramIndex
from jaxinfer.engine.readback import read_samples
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.engine.speculation import Speculation
from jaxinfer.model import params as P
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.layout import plan_layout
from jaxinfer.sharding import make_mesh

STORIES = "tests/data/stories260K/stories260K.bin"
TEXTS = [
    "Once upon a time",
    "The cat sat on the mat. The cat sat on the",
    "Lily and Ben went to the park. They saw a big dog and",
    "Tom had a red ball. Tom had a red ball. Tom had",
    "One day, a little boy named Tim",
    "Sue said: I like the sun. Mom said: I like the sun. Dad said:",
    "The bird sang. The bird sang. The bird",
]


def noisy_copy(model: ShardedModel, scale: float, seed: int) -> ShardedModel:
    """The model with Gaussian noise on every weight: a draft that agrees with it often, not always."""
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [a + scale * jnp.std(a) * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return dataclasses.replace(model, params=jax.tree.unflatten(tree, noisy))


def trained_head(target: ShardedModel, model: ShardedModel, requests, results) -> ShardedModel:
    """A feature head (`jaxinfer.model.feature_head`) trained for a few seconds on the target's hidden
    states over these requests' prompts and outputs, placed on `model`'s mesh: it agrees with the target
    often, not always. `target`: the same model on one device."""
    from jaxinfer.distill import head as H
    from jaxinfer.distill.data import Sequences
    from jaxinfer.distill.draft import choose_head_ids

    seqs = Sequences.from_results([r.prompt_ids for r in requests], results, [True] * len(results))
    states = H.target_features(target, seqs)
    tc = target.config
    config = H.head_config(tc, 1, 128, "head")
    host = jax.tree.map(np.asarray, target.params)
    ids = choose_head_ids(seqs.tokens, seqs.answer_mask(), tc.vocab_size, 128, (2,))
    params = H.initial_params(host, tc, config, ids, seed=0)
    trained = H.train(config, params, host["embed"], (seqs, states), (seqs, states), H.HeadSettings(150, 128, 3e-3, 0))
    mesh = model.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = jax.tree.map(lambda a: jax.device_put(a, replicated), trained.params)
    layout = plan_layout(config, mesh.shape["tensor"], quiet=True)
    return ShardedModel(config, layout, mesh, placed, jnp.float32, layer_loop=model.layer_loop)


def fifty_requests(tok):
    rng = random.Random(5)
    reqs = []
    for i in range(50):
        text = TEXTS[i % len(TEXTS)]
        sampled = i % 2 == 1
        params = SamplingParams(
            max_tokens=rng.randint(6, 24),
            temperature=0.8 if sampled else 0.0,
            top_p=rng.choice([1.0, 0.9]),
            top_k=rng.choice([0, 20]),
            min_p=rng.choice([0.0, 0.05]),
            seed=i,
            logprobs=True,
        )
        reqs.append(Request(f"r{i}", [tok.bos_id] + tok.encode(text, add_bos=False), params))
    return reqs


def generate(model, tok, mode, draft=None, **kw):
    slots = 4 * model.mesh.shape["data"]
    config = EngineConfig(
        max_slots=slots,
        max_context=64,
        prefill_chunk=8,
        max_step_tokens=8,
        min_bucket=8,  # one bucket: a plain and a verify executable to compile
        page_size=8,
        kv_pages=10,  # 8 per request of 64 tokens: four requests do not fit a shard
        speculative=mode,
        speculative_adaptive=False,
        strict_no_recompile=True,
    )
    engine = Engine(model, tok, config, draft=draft)
    engine.warmup()
    results = engine.generate(fifty_requests(tok))
    return results, engine.status()


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_outputs_equal_decoding_without_speculation(stories, mesh):
    """50 requests (half greedy, half seeded top-p/top-k/min-p sampling), preempted for pages: n-gram and
    draft-model speculation (and on 2x4 a feature head) give the same tokens, finish reasons and logprobs,
    and compile nothing after warm-up."""
    models, tok = stories
    model = models[mesh]
    expected, base = generate(model, tok, "none")
    assert base.preemptions > 0
    runs = [("ngram", None), ("draft", noisy_copy(model, 0.3, seed=1))]
    if mesh == "2x4":  # a feature head too, on the sharded mesh (test_distill runs one exactly on 1x1)
        runs.append(("draft", trained_head(models["1x1"], model, fifty_requests(tok), expected)))
    for mode, draft in runs:
        results, status = generate(model, tok, mode, draft)
        assert status.compilations_after_warmup == 0
        assert status.preemptions > 0, mode
        assert 0 < status.spec_accepted < status.spec_proposed, (mode, status)  # both outcomes occurred
        for want, got in zip(expected, results):
            assert got.token_ids == want.token_ids, (mode, got.id)
            assert got.finish_reason == want.finish_reason
            np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
        assert sum(r.speculative_accepted for r in results) == status.spec_accepted


def tiny_vocab_model(mesh, vocab=6):
    config = get_preset("tiny").replace(name="tiny6", vocab_size=vocab, num_layers=1)
    layout = plan_layout(config, 1)
    params = P.init_params(config, layout, mesh, jnp.float32, 11)
    params = jax.tree.map(lambda a: a * 3.0, params)  # peaked, position-dependent distributions
    return ShardedModel(config, layout, mesh, params, jnp.float32).with_layer_loop("unrolled")


PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # n-gram lookup proposes 3, 1, 2, 3
DRAWS = 20_000
# draws under the wrong rule: it fails with a p-value that underflows to 0 already at 500 draws (measured),
# so a tenth of DRAWS shows the test would catch it; with all DRAWS it could only fail harder
WRONG_DRAWS = DRAWS // 10


def tiny_vocab_engine(model):
    config = EngineConfig(
        max_slots=128,
        max_context=16,
        prefill_chunk=8,
        max_step_tokens=512,
        min_bucket=512,  # one bucket: two executables to compile
        page_size=8,
        speculative="ngram",
        speculative_adaptive=False,
        num_speculative_tokens=2,
    )
    engine = Engine(model, None, config)
    engine.warmup()
    return engine


def generate_draws(engine, draws=DRAWS):
    """The first three tokens of `draws` seeded requests (one seed each)."""
    params = lambda seed: SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
    results = engine.generate(Request(f"d{i}", list(PROMPT), params(i)) for i in range(draws))
    return np.array([r.token_ids for r in results])


def exact_distribution(model, vocab):
    """P(t1, t2, t3 | prompt) from the dense forward pass: [vocab ** 3]."""
    prefixes = [[]] + [[a] for a in range(vocab)] + [[a, b] for a in range(vocab) for b in range(vocab)]
    rows = np.array([PROMPT + p + [0] * (2 - len(p)) for p in prefixes])
    logits = model.logits(rows)
    probs = {}
    for p, row in zip(prefixes, logits):
        probs[tuple(p)] = np.asarray(jax.nn.softmax(row[len(PROMPT) + len(p) - 1]))
    joint = np.zeros((vocab,) * 3)
    for a in range(vocab):
        for b in range(vocab):
            joint[a, b] = probs[()][a] * probs[(a,)][b] * probs[(a, b)]
    return joint.reshape(-1)


def chi_square_p(samples, joint, vocab):
    cells = samples[:, 0] * vocab * vocab + samples[:, 1] * vocab + samples[:, 2]
    observed = np.bincount(cells, minlength=vocab**3).astype(float)
    expected = joint * len(samples)
    rare = expected < 5  # pooled into one cell
    obs = np.append(observed[~rare], observed[rare].sum())
    exp = np.append(expected[~rare], expected[rare].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sampled_tokens_follow_the_models_distribution(monkeypatch):
    """20,000 seeded draws of three tokens with n-gram speculation match the model's exact joint
    distribution (chi-square p > 0.01); accepting every proposal instead fails the same test, even on a
    tenth of the draws."""
    model = tiny_vocab_model(make_mesh("1x1"))
    joint = exact_distribution(model, 6)
    engine = tiny_vocab_engine(model)
    samples = generate_draws(engine)
    status = engine.status()
    assert status.spec_windows >= DRAWS // 2 and 1000 < status.spec_accepted < status.spec_proposed - 1000
    assert chi_square_p(samples, joint, 6) > 0.01

    def accept_everything(pending):  # the wrong rule, on the host: every proposal kept, then the last sample
        tokens = np.asarray(pending.outputs.samples.tokens)
        for sampled, window in zip(pending.sampled_chunks, read_samples(pending)):
            proposals = list(sampled.chunk.proposals)
            if proposals:
                kept = proposals + [int(tokens[sampled.shard, sampled.rows[-1]])]
                window = dataclasses.replace(window, tokens=kept, logprobs=[0.0] * len(kept))
            yield window

    monkeypatch.setattr(engine_module, "read_samples", accept_everything)
    wrong = generate_draws(engine, WRONG_DRAWS)
    assert chi_square_p(wrong, joint, 6) < 1e-6


def test_ngram_lookup_takes_the_latest_longest_match():
    index = NgramIndex()
    index.extend([5, 6, 7, 8, 9, 1, 6, 7, 2, 5, 6, 7])
    assert index.propose(3) == [8, 9, 1]  # the 3-gram 5 6 7 beats the later 2-gram 6 7
    index.extend([8])
    assert index.propose(2) == [9, 1]  # 5 6 7 8
    latest = NgramIndex()
    latest.extend([1, 2, 9, 1, 2, 8, 3, 1, 2])
    assert latest.propose(2) == [8, 3]  # of two earlier 1 2, the latest
    periodic = NgramIndex()
    periodic.extend([4, 3, 4, 3, 4])
    assert periodic.propose(4) == [3, 4, 3, 4]
    assert NgramIndex().propose(4) == []


def test_adaptive_policy_turns_speculation_off_when_the_window_costs_more_than_it_gives():
    """With measured step times where a verify step costs 3x a plain one, slots whose proposals are
    mostly rejected stop speculating; with a verify step as cheap as a plain one they speculate."""

    class Seq:
        def __init__(self, i, history):
            self.id, self.finished, self.num_computed, self.known = f"s{i}", None, 20, 21
            self.request = Request(self.id, list(range(10)), SamplingParams())
            self.speculate, self.history, self.draft_proposals, self.draft_valid = False, history, [], 20

    spec = Speculation("draft", 4, (1, 2, 4, 8, 16, 32, 64), 1)
    spec.times.record(False, 8, 0.010)
    spec.times.record(True, 16, 0.030)
    spec.times.record(True, 64, 0.030)
    seqs = [Seq(i, (100, 10)) for i in range(8)]  # 10% acceptance
    spec.decide(seqs)
    assert not any(s.speculate for s in seqs)
    spec.times.seconds[(True, 64)] = 0.010
    good = [Seq(i, (100, 90)) for i in range(8)]
    spec.decide(good)
    assert all(s.speculate for s in good)
    for _ in range(4):  # measured: steps with windows gave fewer tokens per second than steps without
        spec.rates.record(8, True, 8, 0.02)
        spec.rates.record(8, False, 8, 0.01)
    spec.decide(good)
    assert not any(s.speculate for s in good)  # the measurement overrules the prediction


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft-model", STORIES], "--draft-model tests/data/stories260K/stories260K.bin: needs --speculative draft"),
        (["--speculative", "draft"], "--speculative draft: needs --draft-model PATH"),
        (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens 0 must be an integer"),
        (
            ["--speculative", "ngram", "--num-speculative-tokens", "8", "--max-step-tokens", "8"],
            "--num-speculative-tokens 8 needs K + 1 = 9 tokens per step, above the step budget of 8",
        ),
        (["--speculative", "draft", "--draft-model", "tiny"], "--draft-model tiny: its vocabulary has 256 tokens"),
    ],
)
def test_bad_speculation_flags_get_one_line_and_exit_2(flags, message, capsys, tmp_path):
    argv = ["--model", STORIES, "--mesh", "1x1", "--max-slots", "2", "--prompt", "Once", "--max-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv + flags)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit_info.value.code == 2
    assert len(err) == 1 and message in err[0], err


def test_a_draft_with_another_tokenizer_is_refused(tmp_path, capsys):
    """Same vocabulary size, one token's bytes changed: refused in one line naming the token."""
    import struct

    from jaxinfer.checkpoint.load import convert

    raw = pathlib.Path("tests/data/stories260K/tok512.bin").read_bytes()
    offset, token = 4, 0  # after max_token_length: per token a float32 score, an int32 length, the bytes
    while token < 300:
        (length,) = struct.unpack_from("<i", raw, offset + 4)
        offset += 8 + length
        token += 1
    (length,) = struct.unpack_from("<i", raw, offset + 4)
    changed = raw[: offset + 8] + bytes(b ^ 0x20 for b in raw[offset + 8 : offset + 8 + length])
    other = tmp_path / "tok512.bin"
    other.write_bytes(changed + raw[offset + 8 + length :])
    draft = convert(STORIES, tmp_path / "draft")
    manifest = json.loads((draft / "jaxinfer.json").read_text())
    (draft / "jaxinfer.json").write_text(json.dumps({**manifest, "tokenizer": str(other)}))
    argv = ["--model", STORIES, "--mesh", "1x1", "--max-slots", "2", "--prompt", "Once", "--max-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv + ["--speculative", "draft", "--draft-model", str(draft)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit_info.value.code == 2
    want = f"--draft-model {draft}: its tokenizer differs from the model's (token 300); use the same tokenizer"
    assert err == [f"jaxinfer.run: error: {want}"]
