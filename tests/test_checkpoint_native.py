"""Native (Orbax) checkpoints: convert once, restore onto any mesh with identical logits."""

import subprocess
import sys

import numpy as np
import pytest

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.load import load_model
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import make_mesh
from tests.hf_reference import save_random_hf_llama

CFG = ModelConfig(
    name="ck",
    vocab_size=390,
    hidden_size=96,
    intermediate_size=90,
    num_layers=2,
    num_heads=6,
    num_kv_heads=3,
    head_dim=16,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf")
    save_random_hf_llama(CFG, hf_dir, seed=5)
    dst = tmp_path_factory.mktemp("native") / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.convert", str(hf_dir), str(dst)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return hf_dir, dst


def test_restore_on_other_meshes_gives_identical_logits(converted):
    hf_dir, dst = converted
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 20))
    direct = load_model(str(hf_dir), make_mesh("1x1"), "float32").logits(tokens)
    for mesh_name in ("1x1", "2x4", "1x2x4"):  # 2x4 and 1x2x4 need padded heads: padding runs at restore
        restored = load_model(str(dst), make_mesh(mesh_name), "float32")
        assert restored.layout.q_heads >= CFG.num_heads
        ours = restored.logits(tokens)
        if mesh_name == "1x1":  # same mesh, same computation: bit-identical
            np.testing.assert_array_equal(ours, direct)
        else:  # other meshes change reduction order only
            np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-5)


def test_restore_is_sharded_on_the_mesh(converted):
    _, dst = converted
    model = load_model(str(dst), make_mesh("2x4"), "float32", layer_loop="scan")  # the checkpoint's stacked layout
    q = model.params["layers"]["attn"]["q"]  # [L, E, Hq, D], heads split over tensor=4
    assert q.shape[2] == 8 and q.sharding.spec[2] == "tensor"
    assert len({str(s.index) for s in q.addressable_shards}) == 4


def test_restore_in_bfloat16(converted):
    _, dst = converted
    model = load_model(str(dst), make_mesh("1x1"), "bfloat16")
    assert str(model.params["embed"].dtype) == "bfloat16"


def test_corrupt_native_checkpoint_is_a_clear_error(converted, tmp_path):
    import shutil

    _, dst = converted
    broken = tmp_path / "broken"
    shutil.copytree(dst, broken)
    shutil.rmtree(broken / "params")
    with pytest.raises(CheckpointError, match="broken/params: cannot restore checkpoint"):
        load_model(str(broken), make_mesh("1x1"))


def test_convert_into_an_existing_file_is_one_line_and_exit_2(converted, tmp_path, capsys):
    from jaxinfer.convert import main

    hf_dir, _ = converted
    taken = tmp_path / "taken.txt"
    taken.write_text("not a checkpoint directory")
    with pytest.raises(SystemExit) as e:
        main([str(hf_dir), str(taken)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{taken}: exists and is not a directory" in err
    assert taken.read_text() == "not a checkpoint directory"
