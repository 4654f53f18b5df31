"""What qwix (Google's JAX quantization library) does with jaxinfer's model: the measurements behind
docs/QWIX_EVALUATION.md. Needs `pip install qwix` (not a dependency of jaxinfer).

    python scripts/qwix_evaluation.py [--models tiny stories260k] [--tokens 1 8 32] [--shapes 576x1536] [--tpu]

1. coverage: qwix PTQ (`quantize_model` + `quantize_params`) on jaxinfer's Llama as it is, and with
   projections that contract each weight as declared (`jnp.einsum`; passed in as the module's
   `projections` attribute, the model code unchanged), scan and unrolled layers: which weights become
   QArrays, and the largest logit difference against float (or the error that stopped it);
2. matmuls on CPU, x [N, in] @ W [in, out]: float32, bfloat16 weights, qwix int8 / int4 weight-only,
   qwix int8 with dynamic int8 activations, and two hand-written int8 forms: the dot XLA:CPU runs (its
   operand types, from the optimized HLO), the relative error, and the time per call (alternating, medians);
3. with --tpu: the same matmuls AOT-compiled for TPU v5e:2x4 (weight split over 8 chips along `out`):
   whether each compiles, the fused dot's operand types and the argument bytes per chip; and SmolLM2's
   architecture (abstract weights) float and qwix-quantized, compiled whole for v5e:2x4.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DN = (((1,), (0,)), ((), ()))  # x [N, in] . W [in, out]


def einsum_projections():
    """jaxinfer's token-major projections, contracting the declared weight with one einsum (what qwix's
    PTQ intercepts) instead of reshaping it to 2-D and using `@`."""
    import jax.numpy as jnp

    from jaxinfer.model.projections import TokenMajor

    @dataclasses.dataclass(frozen=True)
    class EinsumProjections(TokenMajor):
        def apply(self, x, w, inputs: int):
            i, o = "ijk"[:inputs], "xyz"[: len(w.shape) - inputs]
            return jnp.einsum(f"bt{i},{i}{o}->bt{o}", x, w)

    return EinsumProjections()


def coverage(preset: str) -> list[dict]:
    """qwix PTQ on `preset` (random weights) in several forms: quantized leaves and logit error, or the error."""
    import jax
    import jax.numpy as jnp
    import qwix

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.model.attention import DenseCausal
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh("1x1")
    model = load_model(preset, mesh, "float32", layer_loop="scan")
    tokens = jnp.array([[1, 2, 3, 4]], jnp.int32)
    pos = jnp.array([[0, 1, 2, 3]], jnp.int32)
    ctx = DenseCausal(pos, mesh, False, False)
    scan_params = model.params
    unrolled_params = {k: v for k, v in scan_params.items() if k != "layers"}
    for i in range(model.config.num_layers):
        unrolled_params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], scan_params["layers"])
    einsum = dataclasses.replace(model.module, projections=einsum_projections())
    unrolled = dataclasses.replace(einsum, layer_loop="unrolled")
    forms = [
        ("as is, scan", model.module, scan_params, jnp.int8, None),
        ("einsum projections, scan", einsum, scan_params, jnp.int8, None),
        ("einsum projections, unrolled", unrolled, unrolled_params, jnp.int8, None),
        ("einsum, unrolled, int4 tile 16", unrolled, unrolled_params, jnp.int4, 16),
        ("einsum, unrolled, int4 tile 32", unrolled, unrolled_params, jnp.int4, 32),
    ]

    def run(name, module, params, qtype, tile) -> dict:
        row = {"model": preset, "form": name, "qtype": jnp.dtype(qtype).name, "tile": tile}
        try:
            ref, _ = jax.jit(lambda p: module.apply({"params": p}, tokens, pos, ctx))(params)
            rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, tile_size=tile)]
            qmodule = qwix.quantize_model(module, qwix.PtqProvider(rules))
            abstract = jax.eval_shape(lambda: qmodule.init(jax.random.key(0), tokens, pos, ctx))["params"]
            is_aux = lambda x: type(x).__name__ == "WithAux"  # noqa: E731
            leaves = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=is_aux)
            row["quantized"] = sorted(jax.tree_util.keystr(p) for p, leaf in leaves if is_aux(leaf))
            quantized = qwix.quantize_params(params, abstract)
            out, _ = jax.jit(lambda p: qmodule.apply({"params": p}, tokens, pos, ctx))(quantized)
            row["max_logit_error"] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        except Exception as e:  # what stops qwix is the finding
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        kinds = sorted({re.findall(r"'(\w+)'", q)[-1] for q in row.get("quantized", [])})
        outcome = row["error"] if "error" in row else f"max logit error {row['max_logit_error']:.2e}"
        print(f"  {preset} {name:34s} {len(row.get('quantized', []))} quantized {kinds}: {outcome}")
        return row

    rows = [run(*form) for form in forms]
    cpu = model.with_layer_loop("unrolled")  # the CPU layout (output-major weights); consumes the scan params
    rows.append(run("as is, unrolled (CPU layout)", cpu.module, cpu.params, jnp.int8, None))
    return rows


def matmul_variants(w):
    """{name: (fn(x, *weights), weights)} for one float weight w [in, out]."""
    import jax.numpy as jnp
    import qwix

    q8 = qwix.quantize(w, jnp.int8, channelwise_axes=[1])  # one scale per output channel
    q4 = qwix.quantize(w, jnp.int4, channelwise_axes=[1], tiled_axes={0: 64})  # groups of 64 along `in`
    codes, scale = q8.qvalue, q8.scale  # the same int8 numbers for the hand-written forms

    def w8a8(x, qw):
        return qwix.dot_general(qwix.quantize(x, jnp.int8, channelwise_axes=[0]), qw, DN)

    return {
        "float32": (lambda x, w: x @ w, (w,)),
        "bfloat16 weights": (
            lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32),
            (w.astype(jnp.bfloat16),),
        ),
        "qwix int8 weight-only": (lambda x, qw: qwix.dot_general(x, qw, DN), (q8,)),
        "qwix int4 g64 weight-only": (lambda x, qw: qwix.dot_general(x, qw, DN), (q4,)),
        "qwix int8 w8a8 (dynamic)": (w8a8, (q8,)),
        "hand int8 dequantize, dot": (lambda x, c, s: x @ (c.astype(jnp.float32) * s), (codes, scale)),
        "hand int8 dot, scale output": (lambda x, c, s: (x @ c.astype(jnp.float32)) * s, (codes, scale)),
    }


def dot_operands(hlo: str) -> str:
    """`dot(a, b)` of an optimized HLO module as 'TYPE dot(TYPE a, TYPE b)', the operand types looked up."""
    types = dict(re.findall(r"%(\S+) = (\w+\[[^\]]*\])", hlo))
    for line in hlo.splitlines():
        m = re.search(r"= (\w+\[[^\]]*\])\S* (?:dot|convolution)\(%([^,]+), %([^,)]+)", line)
        if m:
            return f"{m.group(1)} dot({types.get(m.group(2), '?')}, {types.get(m.group(3), '?')})"
    return "no dot"


def matmuls(shapes, token_counts, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        w = jnp.asarray(rng.normal(0, 0.02, (k, n)), jnp.float32)
        variants = matmul_variants(w)
        for tokens in token_counts:
            x = jnp.asarray(rng.normal(0, 1, (tokens, k)), jnp.float32)
            fns = {name: jax.jit(f) for name, (f, _) in variants.items()}
            args = {name: (x,) + ws for name, (_, ws) in variants.items()}
            ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
            row = {"shape": shape, "tokens": tokens, "variants": {}}
            times = {name: [] for name in fns}
            for name, f in fns.items():
                out = np.asarray(f(*args[name]), np.float64)
                row["variants"][name] = {
                    "relative_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                    "cpu_dot": dot_operands(f.lower(*args[name]).compile().as_text()),
                }
            for _ in range(repeats):  # alternating: each round calls every variant 10 times
                for name, f in fns.items():
                    start = time.perf_counter()
                    for _ in range(10):
                        out = f(*args[name])
                    out.block_until_ready()
                    times[name].append((time.perf_counter() - start) / 10)
            base = statistics.median(times["float32"])
            print(f"  {shape} N={tokens}:")
            for name, v in row["variants"].items():
                v["us"] = statistics.median(times[name]) * 1e6
                v["speed_vs_float32"] = base * 1e6 / v["us"]
                print(
                    f"    {name:28s} {v['us']:9.1f} us {v['speed_vs_float32']:5.2f}x  err {v['relative_error']:.1e}  "
                    f"{v['cpu_dot']}"
                )
            rows.append(row)
    return rows


def tpu_compile(shape: str) -> list[dict]:
    """The matmuls AOT-compiled for TPU v5e:2x4 (8 chips, the weight and its scales split along `out`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    mesh = Mesh(np.array(devices).reshape(1, 8), ("data", "tensor"))
    k, n = map(int, shape.split("x"))
    w = jnp.asarray(np.random.default_rng(0).normal(0, 0.02, (k, n)), jnp.float32)
    x = jax.ShapeDtypeStruct((8, k), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def split(a):  # along the last axis (`out`; a scale's too)
        sharding = NamedSharding(mesh, PartitionSpec(*([None] * (a.ndim - 1) + ["tensor"])))
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    rows = []
    for name, (f, ws) in matmul_variants(w).items():
        abstract = jax.tree.map(split, ws)
        row = {"variant": name, "shape": shape}
        try:
            compiled = jax.jit(f).lower(x, *abstract).compile()
            row["tpu_dot"] = dot_operands(compiled.as_text())
            row["argument_bytes_per_chip"] = compiled.memory_analysis().argument_size_in_bytes
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(f"  {name:28s} " + (row.get("error") or f"{row['tpu_dot']}  {row['argument_bytes_per_chip']} B/chip"))
    return rows


def tpu_model(preset: str) -> list[dict]:
    """`preset` (abstract weights) in bfloat16 with einsum projections and unrolled layers, float and qwix-
    quantized (layers only: the tied table stays float), compiled for TPU v5e:2x4 as data 2 x tensor 4;
    every leaf, scales included, sharded through jaxinfer's LOGICAL_RULES from the names qwix keeps."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxinfer.config import get_preset
    from jaxinfer.model.attention import DenseCausal
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.model.llama import Llama
    from jaxinfer.sharding import logical_sharding

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    mesh = Mesh(np.array(devices).reshape(2, 1, 4), ("data", "sequence", "tensor"))
    config = get_preset(preset)
    base = Llama(config, plan_layout(config, 4, quiet=True), jnp.bfloat16, "unrolled", einsum_projections())
    zeros = jnp.zeros((2, 1), jnp.int32)
    rows_sharding = NamedSharding(mesh, PartitionSpec("data"))
    tokens = jax.ShapeDtypeStruct((2, 1), jnp.int32, sharding=rows_sharding)

    def place(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            v = leaf.value
            return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=logical_sharding(mesh, leaf.names, v.shape))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    rows = []
    for qtype, tile in ((None, None), (jnp.int8, None), (jnp.int4, 64)):
        module = base
        if qtype is not None:
            rules = [qwix.QuantizationRule(module_path=r"layers_\d+/.*", weight_qtype=qtype, tile_size=tile)]
            module = qwix.quantize_model(base, qwix.PtqProvider(rules))
        init = lambda m=module: m.init(jax.random.key(0), zeros, zeros, DenseCausal(zeros))  # noqa: E731
        params = jax.tree.map(
            place, jax.eval_shape(init)["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )

        def forward(params, tokens, positions, module=module):
            return module.apply({"params": params}, tokens, positions, DenseCausal(positions))[0]

        row = {"model": preset, "weights": "bfloat16" if qtype is None else f"{jnp.dtype(qtype).name} tile {tile}"}
        k = params["layers_0"]["attn"]["k"]
        row["k_leaf"] = str(jax.tree.map(lambda s: (s.shape, str(s.dtype), tuple(s.sharding.spec)), k))
        try:
            mem = jax.jit(forward).lower(params, tokens, tokens).compile().memory_analysis()
            row["argument_mib_per_chip"] = mem.argument_size_in_bytes / 2**20
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(
            f"  {preset} {row['weights']:12s} " + (row.get("error") or f"{row['argument_mib_per_chip']:.1f} MiB/chip")
        )
        print(f"    k: {row['k_leaf']}")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "stories260k"],
        help="presets the coverage check quantizes (untied, tied)",
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "576x49152"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tpu", action="store_true", help="also AOT-compile the matmuls for TPU v5e:2x4 (needs libtpu)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tpu:  # TPU topologies compile from the CPU backend, described before anything else starts JAX
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import qwix

    from jaxinfer.perf import write_report

    result = {"jax": jax.__version__, "qwix": qwix.__version__, "device": jax.devices()[0].device_kind}
    if args.tpu:
        print("TPU v5e:2x4 (AOT):")
        result["tpu"] = tpu_compile(args.shapes[0])
        result["tpu_model"] = tpu_model("smollm2-135m")
    print("coverage:")
    result["coverage"] = [row for preset in args.models for row in coverage(preset)]
    print("CPU matmuls:")
    result["matmuls"] = matmuls(args.shapes, args.tokens, args.repeats)
    return write_report(result, args.json)


if __name__ == "__main__":
    main()
