"""Weight-only quantization: the representation (`spec`, `arrays`), the host-side quantizers
(`quantize`) and the dequantizing matmul the model's projections call.

A quantized weight is three parameter leaves beside each other: `NAME` (integer codes, the float
weight's shape), `NAME_scale` and, for asymmetric formats, `NAME_offset` (float32, one per output
channel and group). The dequantized weight is `codes * scale + offset`, groups running in
consecutive runs along the weight's last contraction axis (see `spec.WeightQuant`).
"""
