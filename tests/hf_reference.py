"""Helpers that build Hugging Face transformers reference models (torch, CPU) for parity tests."""

from __future__ import annotations

import numpy as np


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
