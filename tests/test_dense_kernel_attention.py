"""The dense (no-cache) forward with the Pallas flash attention kernel equals the reference path."""

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.sharding import make_mesh
from tests.hf_reference import relative_error


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_flash_kernel_logits_equal_reference(mesh):
    model = load_model("tiny", make_mesh(mesh), seed=1)  # random weights, 4 query / 2 KV heads (GQA)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 40))
    positions = np.tile(np.arange(40), (2, 1))
    positions[1, 25:] = -1  # right padding
    ref = model.logits(tokens, positions, attention="xla")
    ker = model.logits(tokens, positions, attention="pallas")
    assert relative_error(ker[0], ref[0]) < 1e-5
    assert relative_error(ker[1, :25], ref[1, :25]) < 1e-5


def test_unknown_attention_is_refused():
    model = load_model("tiny", make_mesh("1x1"))
    with pytest.raises(ValueError, match="attention='flash': must be xla or pallas"):
        model.logits(np.zeros((1, 4), np.int32), attention="flash")
