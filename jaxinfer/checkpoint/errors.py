"""The one exception checkpoint readers raise.

Every message is a single line that starts with the offending file (or directory) and
names the tensor where one is involved, e.g.
``/ckpt/model.safetensors: truncated: header says 1234 bytes, file has 1000``.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or in an unsupported format."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
