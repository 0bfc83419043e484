"""The engines of the native backend, by what each runs. Pure: the planner and the loader both name them."""

from __future__ import annotations

import enum


class Engine(str, enum.Enum):
    ONE_GPU = "one-gpu"  # the whole model on one GPU (forced with --engine, on the CPU: how CI checks it)
    TENSOR_PARALLEL = "tensor-parallel"  # one model over GPUs of one node, a process per GPU
    REPLICAS = "replicas"  # data parallel: replicas of one or more GPUs, each decoding its share of sequences
    HYBRID = "hybrid"  # MoE: routed experts in host RAM computed by the CPU, the rest (and hot experts) on a GPU

    def __str__(self) -> str:
        return self.value


RANK_ENGINES = (Engine.TENSOR_PARALLEL, Engine.REPLICAS)  # one process per GPU, in a torchrun job qwenhw drives

# Plans saved before the native backend existed named its engines as the offload backend's.
RENAMES = {("offload", "transformers-fast"): Engine.ONE_GPU, ("offload", "transformers-tp"): Engine.TENSOR_PARALLEL,
           ("offload", "transformers-dp"): Engine.REPLICAS, ("offload", "hybrid-moe"): Engine.HYBRID}
