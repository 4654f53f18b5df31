"""Helpers that build Hugging Face transformers reference models (torch, CPU) for parity tests."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

SESSION_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache"


def save_random_hf_llama(config, path, seed: int = 0, dtype: str = "float32", head_scale: float = 1.0):
    """Random-weight `LlamaForCausalLM` with `config` (a jaxinfer ModelConfig), saved with save_pretrained.
    `head_scale` multiplies lm_head: a random model's logits are nearly tied, and a larger scale spreads
    them so that greedy choices do not hinge on summation order (comparisons across meshes)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        **{k: v for k, v in config.to_hf_config().items() if k not in ("architectures", "model_type")}
    )
    model = transformers.LlamaForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # HF inits norms to 1; randomise them so a wrong norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy `generate` of `n` tokens after `prompt` (no EOS stop): the ids it adds."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens, dtype=np.int64)))
    return out.logits.float().numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def transformers_from_gguf(gguf_path: str):
    """transformers' float32 model of the GGUF at `gguf_path`, as its own GGUF loader dequantizes it.

    The loader parses the file in Python (its tensor-name maps and the 49k-entry vocabulary): 45-80 s for
    SmolLM2 on two cores, and two modules need it. The first call in a checkout keeps what it built (the
    model's config, less its GGUF quantization note, and its state dict, torch.save'd in .pytest_cache
    beside the suite's compile cache, keyed by transformers' version and the file's size and time).
    Later calls, from either xdist worker or a later run, build the same transformers model from that
    copy in seconds: the same tensors, still transformers' own dequantization. (transformers refuses to
    `save_pretrained` a model loaded from GGUF.)
    """
    import fcntl

    import torch
    import transformers

    stat = os.stat(gguf_path)
    name = f"{pathlib.Path(gguf_path).stem}-transformers-{transformers.__version__}-{stat.st_size}-{stat.st_mtime_ns}"
    saved = SESSION_CACHE / f"{name}.pt"
    SESSION_CACHE.mkdir(exist_ok=True)
    with open(SESSION_CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the one copy instead of parsing too
        if not saved.exists():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
            )
            config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}  # "gguf"
            torch.save({"config": json.dumps(config), "state": model.state_dict()}, f"{saved}.partial")
            os.replace(f"{saved}.partial", saved)
            return model.eval()
    kept = torch.load(saved, weights_only=True)
    config = transformers.AutoConfig.for_model(**json.loads(kept["config"]))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(kept["state"], strict=True)
    return model.eval()
