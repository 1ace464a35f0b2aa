"""Model parallelism for replicas larger than one device: tensor parallelism over attention heads
(MLA, indexer), the dense MLP and the vocabulary; expert parallelism over routed experts.

    dist.py        ParallelContext: rank / world / tp / ep and the few collectives the model needs
    layers.py      the parallel modules (column / row linears, vocab embedding and head, MLA, MoE)
    shard.py       shard a built Transformer in place (real or meta tensors) -> its ShardPlan
    load.py        rank-sliced loading from safetensors (mmap get_slice, FP8 + weight_scale_inv)
    fingerprint.py the snapshot fingerprint of a sharded model (equal to the unsharded one)
    engine.py      LeaderEngine (rank 0 runs the engine loop, broadcasts each command) + follow()
    launch.py      start N local ranks (gloo on CPU, NCCL on GPUs) for tests and the CLI

    .venv/bin/python -m pytest -q tests/model/parallel -p no:cacheprovider
"""
