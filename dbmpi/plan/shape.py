"""What one replica computes and moves per step, from the model's own partition plan.

Sizes (parameters, bytes and messages between partitions) come from
:class:`dbmpi.model.partition.PartitionPlan`, the same plan the training ranks run, so the
cost model counts exactly what the exchange sends. Times per layer come from a calibration
(one rank, the whole layer); a partition's share of a layer is the share of the layer's
output columns its arithmetic spans (LCN computes its whole input slab, then crops).
"""

from __future__ import annotations

from ..model.partition import PartitionPlan
from .cost import Replica


def partition_plan(input_shape, layers, classes: int, partitions: int) -> PartitionPlan:
    return PartitionPlan(input_shape, layers, classes, partitions)


def replica(plan: PartitionPlan, layer_s: list[float], batch: int,
            layer_batch: int | None = None, overhead_s: float = 0.0) -> Replica:
    """The :class:`Replica` of ``plan`` for minibatches of ``batch`` examples.

    ``layer_s``: seconds of forward + backward of each layer of the unpartitioned model (the
    output layer and loss last) for ``layer_batch`` examples (default ``batch``); time is taken
    as proportional to the batch.
    """
    if len(layer_s) != plan.num_layers:
        raise ValueError(f"{len(layer_s)} layer times for {plan.num_layers} layers")
    scale = batch / (layer_batch or batch)
    P = plan.P
    compute = cpu = 0.0
    for row, t in zip(plan.parts, layer_s):
        n_out = row[0].spec.n_out
        shares = [(part.computed[1] - part.computed[0]) / n_out for part in row]
        compute += t * scale * max(shares)  # the partitions meet at every layer boundary
        cpu += t * scale * sum(shares)
    sends = plan.bytes_per_step(batch)
    msgs, syncs = messages(plan)
    return Replica(partitions=P, batch=batch, params=plan.num_params,
                   part_params=max(plan.param_sizes), compute_s=compute, cpu_s=cpu,
                   exchange_bytes=max(sends), exchange_msgs=max(msgs), syncs=syncs,
                   overhead_s=overhead_s)


def messages(plan: PartitionPlan) -> tuple[list[int], int]:
    """Messages (sends + receives) of each partition per step, and the points per step where
    the partitions wait for each other (every layer boundary with transfers, forward and,
    but for the logits, backward)."""
    msgs = [0] * plan.P
    syncs = 0
    for layer, ts in enumerate(plan.transfers):
        backward = layer < len(plan.parts)
        syncs += (1 + backward) if ts else 0
        for tr in ts:
            msgs[tr.src] += 1 + backward
            msgs[tr.dst] += 1 + backward
    return msgs, syncs


def flops_per_example(plan: PartitionPlan) -> float:
    """Multiply-adds x 2 of forward + backward per example (3 GEMM-shaped passes over every
    weight; the first layer needs no input gradient): the paper's count."""
    total = 0.0
    for i, spec in enumerate(plan.specs):
        w = spec.num_params()
        total += 2 * w * (2 if i == 0 else 3)
    return total
