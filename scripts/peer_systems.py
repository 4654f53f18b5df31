"""The generation systems scripts/compare_hf.py and scripts/compare_peers.py time, on one model.

Every system turns a batch of equal-length token prompts into `new_tokens` greedy tokens each (EOS
ignored), so batched outputs are comparable token for token and every system does the same work:
- jaxinfer: an `Engine` (prefix cache off: every repetition computes its prompts, as the others do);
- transformers: `generate(do_sample=False)` on the same weights (a GGUF file through its GGUF loader);
- CTranslate2 (optional): the transformers model converted with its own converter (`ctranslate2_generator`).
"""

from __future__ import annotations

import copy
import os
import tempfile


def add_benchmark_args(p) -> None:
    """The flags both comparison scripts take."""
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="a Hugging Face Llama directory (default: the embedded SmolLM2)")
    p.add_argument("--mesh", default="1x1")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "native", "xla"],
        help="jaxinfer's attention path (auto: the native C++ kernel on CPU where it builds)",
    )
    p.add_argument("--json", default=None)


def reference_model(model: str | None, dtype: str = "float32"):
    """(transformers model, jaxinfer tokenizer or None) of `model`: a Hugging Face Llama directory (token
    ids in and out, no tokenizer), a GGUF file, or None: the embedded SmolLM2 GGUF (transformers' GGUF loader)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    if model is not None and not model.endswith(".gguf"):
        return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval(), None
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path
    from jaxinfer.tokenizer import load_tokenizer

    gguf = os.path.abspath(model or smollm2_gguf_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=getattr(torch, dtype)
    )
    return hf.eval(), load_tokenizer(gguf)


def prompt_source(tokenizer, vocab_size: int, length: int) -> list[int]:
    """At least `length` token ids to cut prompts from: English text with a tokenizer, else seeded ids."""
    import numpy as np

    if tokenizer is None:
        return np.random.default_rng(0).integers(0, vocab_size, length).tolist()
    text = (
        "The history of astronomy is long. Ancient peoples watched the sky to keep time and tell stories "
        "about the planets, the moon and the stars. "
    )
    return tokenizer.encode(text * (length // 16 + 1), add_bos=False)[:length]  # the text is over 16 tokens


def batch_prompts(source: list[int], batch: int, prompt_tokens: int) -> list[list[int]]:
    """`batch` different prompts of `prompt_tokens` tokens (windows of `source` one token apart)."""
    return [source[i : i + prompt_tokens] for i in range(batch)]


def jaxinfer_engine(model, max_batch: int, prompt_tokens: int, new_tokens: int, attention: str = "auto"):
    """A warmed-up engine for batches of up to `max_batch` prompts: its step budget holds the whole
    batch's prompts, as transformers prefills a batch in one call."""
    from jaxinfer.engine.engine import Engine, EngineConfig

    engine = Engine(
        model,
        None,
        EngineConfig(
            max_slots=max(max_batch, model.mesh.shape["data"]),
            max_context=prompt_tokens + new_tokens + 8,
            prefill_chunk=prompt_tokens,
            max_step_tokens=max(max_batch, max_batch * prompt_tokens),
            attention=attention,
            prefix_cache=False,  # the others recompute every prompt in every repetition; so do we
        ),
    )
    engine.warmup()
    return engine


def jaxinfer_generate(engine, prompts: list[list[int]], new_tokens: int, tag: str) -> list[list[int]]:
    from jaxinfer.engine.requests import Request, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    return [r.token_ids for r in engine.generate([Request(f"{tag}-{i}", p, params) for i, p in enumerate(prompts)])]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    x = torch.tensor(prompts)
    with torch.no_grad():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, len(prompts[0]) :].tolist()


class _IdVocabulary:
    """What CTranslate2's Llama converter reads from a tokenizer: the vocabulary (token i is named `<i>`, as
    prompts go in and come out as ids) and the special tokens."""

    def __init__(self, size: int, bos: int | None, eos: int | None):
        self.size = size
        self.bos_token = f"<{bos if bos is not None else 0}>"
        self.eos_token = f"<{eos if eos is not None else 0}>"
        self.unk_token = "<0>"

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.size)}


def ctranslate2_generator(hf, quantization: str = "int8"):
    """A CTranslate2 `Generator` of the (float32) transformers model `hf`, converted by CTranslate2's own
    converter into a temporary directory with `quantization`; None where ctranslate2 is not installed."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None

    plain = copy.deepcopy(hf)  # the converter takes the model apart as it goes
    if getattr(plain.config, "quantization_config", None) is not None:
        del plain.config.quantization_config  # a GGUF file's (the weights are float now); CTranslate2 refuses it

    class _Converter(TransformersConverter):  # the model already in memory; an id vocabulary
        def load_model(self, model_class, path, **kwargs):
            return plain

        def load_tokenizer(self, tokenizer_class, path, **kwargs):
            c = hf.config
            eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
            return _IdVocabulary(c.vocab_size, c.bos_token_id, eos)

    with tempfile.TemporaryDirectory() as tmp:
        plain.config.save_pretrained(tmp)  # the converter reads the architecture from config.json
        out = _Converter(tmp).convert(os.path.join(tmp, "ct2"), quantization=quantization)
        return ctranslate2.Generator(out, device="cpu", compute_type=quantization, intra_threads=os.cpu_count() or 1)


def ctranslate2_generate(generator, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    results = generator.generate_batch(
        [[f"<{t}>" for t in p] for p in prompts],
        max_length=new_tokens,
        min_length=new_tokens,
        sampling_topk=1,
        beam_size=1,
        include_prompt_in_result=False,
    )
    return [r.sequences_ids[0] for r in results]
