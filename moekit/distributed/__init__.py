"""Expert and data parallelism on ``torch.distributed``, exactly equal to one process.

    ctx = init_distributed(ep=2)          # from torchrun's env vars: (dp, ep) mesh, gloo or NCCL
    shard_model(model, ctx)               # each rank keeps E / P experts; MoE layers all-to-all tokens
    train_distributed(config, ep=2)       # the trainer on every rank (``moekit train --nproc N --ep P``)

See :mod:`moekit.distributed.mesh` (groups, failure reports), :mod:`~moekit.distributed.expert_parallel`
(the layer), :mod:`~moekit.distributed.gradients` (why the gradients equal one process's),
:mod:`~moekit.distributed.checkpoint` (sharded checkpoints) and :mod:`~moekit.distributed.launch`.
"""

from moekit.distributed.collectives import STATS, DistributedError, PeerFailure, all_reduce_sum, all_to_all
from moekit.distributed.expert_parallel import ExpertParallel, expert_parameters, shard_model
from moekit.distributed.gradients import clip_grad_norm_, reduce_gradients
from moekit.distributed.mesh import DistContext, init_distributed, run_guarded
from moekit.distributed.trainer import DistributedTrainer, train_distributed

__all__ = [
    "STATS",
    "DistContext",
    "DistributedError",
    "DistributedTrainer",
    "ExpertParallel",
    "PeerFailure",
    "all_reduce_sum",
    "all_to_all",
    "clip_grad_norm_",
    "expert_parameters",
    "init_distributed",
    "reduce_gradients",
    "run_guarded",
    "shard_model",
    "train_distributed",
]
