"""GGUF quantized block bytes -> `QuantizedBlocks` (codes + per-group scales/offsets), without going to float.

Each decoder takes one tensor's bytes as `[rows, blocks_per_row, block_bytes]` uint8 (rows are output
channels, blocks run along the input dimension) and unpacks every code with whole-array numpy ops.
Block layouts are ggml's (`ggml-common.h`); fp16 fields are little-endian, as GGUF files are.

| type | block | codes | group | scale | offset |
|---|---|---|---|---|---|
| Q8_0 | d:f16, qs:int8[32] | int8 | 32 | d | - |
| Q4_0 | d:f16, qs:u8[16] (element j: low nibble of qs[j], j+16: high nibble) | int4 = nibble - 8 | 32 | d | - |
| Q4_1 | d:f16, m:f16, qs:u8[16] (as Q4_0) | uint4 | 32 | d | m |
| Q4_K | d, dmin:f16, 8 (sc, m) 6-bit pairs in 12 bytes, qs:u8[128] | uint4 | 32 | d*sc | -dmin*m |
| Q6_K | ql:u8[128], qh:u8[64], sc:int8[16], d:f16 | int8 = 6-bit - 32 | 16 | d*sc | - |
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from jaxinfer.checkpoint.quantized_blocks import QuantizedBlocks


def _f16(b: np.ndarray) -> np.ndarray:
    """`[..., 2]` uint8 (a little-endian fp16 field in every block) -> `[...]` float32."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[..., n]` packed bytes -> `[..., 2n]` uint8: the n low nibbles, then the n high nibbles."""
    out = np.empty((*qs.shape[:-1], 2 * qs.shape[-1]), np.uint8)
    n = qs.shape[-1]
    np.bitwise_and(qs, 0x0F, out=out[..., :n])
    np.right_shift(qs, 4, out=out[..., n:])
    return out


def _flat(a: np.ndarray) -> np.ndarray:
    """`[rows, blocks, ...]` -> `[rows, blocks * ...]`: per-block pieces laid end to end along the row."""
    return a.reshape(a.shape[0], -1)


def _q8_0(b: np.ndarray) -> QuantizedBlocks:
    values = np.ascontiguousarray(b[..., 2:]).view(np.int8)
    return QuantizedBlocks(_flat(values), _flat(_f16(b[..., 0:2])), None, 32, "int8")


def _q4_0(b: np.ndarray) -> QuantizedBlocks:
    values = _nibbles(b[..., 2:]).view(np.int8)
    values -= 8
    return QuantizedBlocks(_flat(values), _flat(_f16(b[..., 0:2])), None, 32, "int4")


def _q4_1(b: np.ndarray) -> QuantizedBlocks:
    return QuantizedBlocks(_flat(_nibbles(b[..., 4:])), _flat(_f16(b[..., 0:2])), _flat(_f16(b[..., 2:4])), 32, "uint4")


def _q4_k(b: np.ndarray) -> QuantizedBlocks:
    # 8 sub-blocks of 32: sub-blocks 2j and 2j+1 are the low and high nibbles of qs[32j : 32j+32].
    values = _nibbles(b[..., 16:].reshape(*b.shape[:2], 4, 32))  # [rows, blocks, 4, 64]
    # scales[12] = a[4] b[4] c[4]; sub-block j < 4: sc = a[j] & 63, m = b[j] & 63;
    # j >= 4: sc = c[j-4] & 15 | (a[j-4] >> 6) << 4, m = c[j-4] >> 4 | (b[j-4] >> 6) << 4.
    a, bb, c = b[..., 4:8], b[..., 8:12], b[..., 12:16]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1).astype(np.float32)
    mn = np.concatenate([bb & 63, (c >> 4) | ((bb >> 6) << 4)], axis=-1).astype(np.float32)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    return QuantizedBlocks(_flat(values), _flat(d * sc), _flat(-(dmin * mn)), 32, "uint4")


_Q6_HIGH_SHIFT = np.array([0, 2, 4, 6], np.uint8)[:, None]


def _q6_k(b: np.ndarray) -> QuantizedBlocks:
    # Two halves n of 128 elements; element 32k + l of half n (k < 4, l < 32) has its low 4 bits in
    # ql[64n + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2) and its high 2 bits in
    # qh[32n + l] >> 2k. One int8 scale per 16 consecutive elements.
    rows, blocks = b.shape[:2]
    ql = b[..., :128].reshape(rows, blocks, 2, 64)
    qh = b[..., 128:192].reshape(rows, blocks, 2, 1, 32)
    low = _nibbles(ql).reshape(rows, blocks, 2, 4, 32)  # k = 2 * nibble + (which 32 of the 64)
    high = (qh >> _Q6_HIGH_SHIFT) & 3  # [rows, blocks, 2, 4, 32]
    values = (low | (high << 4)).view(np.int8)
    values -= 32
    scale = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32) * _f16(b[..., 208:210])[..., None]
    return QuantizedBlocks(_flat(values), _flat(scale), None, 16, "int8")


DECODERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q6_K: _q6_k}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def decode_blocks(data: np.ndarray, qtype: T, row_len: int) -> QuantizedBlocks:
    """One GGUF tensor's bytes (uint8, `rows * bytes_per_row` in total) -> codes and scales, `[rows, row_len]`.

    `qtype` must be one of `DECODERS`; `row_len` (the HF input length) must be a whole number of blocks,
    as it always is in a valid GGUF file.
    """
    block, nbytes = GGML_QUANT_SIZES[qtype]
    per_row = row_len // block
    assert per_row * block == row_len, (qtype.name, row_len)
    return DECODERS[qtype](np.asarray(data, np.uint8).reshape(-1, per_row, nbytes))
