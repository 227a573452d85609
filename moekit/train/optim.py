"""The optimizer (AdamW, or Muon + AdamW) with parameter groups, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.train.config import RunConfig
from moekit.train.muon import MuonAdamW, is_hidden_matrix


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases (and buffers such as the router bias) are not decayed."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW, or with ``optimizer="muon"`` Muon on the hidden matrices and AdamW on the rest (same lr)."""
    if config.optimizer == "muon":
        return _muon_adamw(model, config)
    groups = parameter_groups(model, config.weight_decay)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        # The fused kernel updates each tensor in one vectorised pass: the demo's 3.4M parameters take 5.3 ms
        # fused against 24 ms for the per-tensor loop (2 threads, idle machine). It is elementwise, so a
        # resumed run stays bit-identical (tested). Devices or dtypes it does not cover get the per-tensor loop.
        **({"fused": True} if _fusable([p for g in groups for p in g["params"]]) else {"foreach": False}),
    )


def _fusable(params: list[torch.Tensor]) -> bool:
    return all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        for p in params
    )


def _muon_adamw(model: nn.Module, config: RunConfig) -> MuonAdamW:
    muon: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if is_hidden_matrix(name, param):
                muon.append(param)
            else:
                (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": muon, "weight_decay": config.weight_decay, "muon": True},
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return MuonAdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2))


def lr_at(step: int, progress: float, config: RunConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``.

    ``step`` counts the optimizer steps taken; ``progress`` in [0, 1] is how far the cosine is (steps over
    ``max_steps``, or a time budget's plan: :meth:`moekit.train.budget.BudgetPlan.progress`).
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
