"""Loads --model onto the multi-host mesh (the real loader, in a real cluster) and prints this process's
host-memory peak during the load and the bytes of the parameter shards it holds, as one JSON line.
`--warm-up CKPT` loads a small checkpoint first, so the one-time cost of the checkpoint libraries
(code, thread pools, caches) is not counted against the model."""

import argparse
import json

from jaxinfer.bootstrap import add_model_args, join_cluster


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--warm-up", default=None)
    args = p.parse_args()
    cluster = join_cluster(args)
    import jax

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.perf import HostMemoryPeak
    from jaxinfer.sharding import make_mesh, parse_mesh

    mesh = make_mesh(parse_mesh(args.mesh))
    if args.warm_up:
        jax.block_until_ready(load_model(args.warm_up, mesh, args.dtype, layer_loop=args.layer_loop).params)
    with HostMemoryPeak() as peak:
        model = load_model(args.model, mesh, args.dtype, layer_loop=args.layer_loop)
        jax.block_until_ready(model.params)
    leaves = jax.tree.leaves(model.params)
    held = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
    total = sum(leaf.nbytes for leaf in leaves)
    largest = max(leaf.nbytes for leaf in leaves)
    print(json.dumps({"peak": peak.bytes, "held": held, "total": total, "largest": largest}), flush=True)
    if cluster.is_leader:
        cluster.stop()
    else:
        assert cluster.commands.get()[0] == "stop"
        cluster.acknowledge_stop()


if __name__ == "__main__":
    main()
