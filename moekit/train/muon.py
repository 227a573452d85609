"""Muon for the hidden matrices, AdamW for the rest, in one optimizer (one state dict to checkpoint).

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982) takes
the momentum of a weight matrix's gradient and replaces it by the nearest semi-orthogonal matrix (five
Newton-Schulz iterations), so every direction of the update moves at the same speed. Stacked expert
weights ``[E, rows, cols]`` are E matrices: each is orthogonalised on its own (one batched matmul).

The update is rescaled by ``0.2 * sqrt(max(rows, cols))`` (Moonlight's "match AdamW RMS"), so the same
learning rate and weight decay suit both halves and the trainer's schedule drives them together.

``torch.optim.Muon`` takes 2-D parameters only; this one also takes the 3-D expert stacks and keeps
the update order fixed (no foreach), so a resumed run stays bit-identical on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Quintic Newton-Schulz coefficients tuned for fast convergence of the singular values towards 1
# (Jordan et al. 2024); five steps leave them in about [0.7, 1.2], which is all Muon needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(grad: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each ``[..., rows, cols]`` matrix (approximately: U V^T of its SVD)."""
    a, b, c = NS_COEFFICIENTS
    x = grad.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-2, -1) if tall else x


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """Muon's share: the matrices inside the blocks (attention, MLPs, experts). Embeddings, the output head
    and the router stay on AdamW: they map to or from a vocabulary or a softmax, not a hidden space."""
    if param.dim() < 2:
        return False
    return not any(part in name for part in ("embed", "lm_head", "router", "head."))


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``muon=True`` get Muon (momentum ``momentum``, Nesterov); the others get AdamW."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum: float = 0.95,
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = {"lr": lr, "betas": betas, "momentum": momentum, "eps": eps, "weight_decay": 0.0, "muon": False}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self._muon_update(p, p.grad, group)
                else:
                    self._adamw_update(p, p.grad, group)
        return loss

    def _muon_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        nesterov = grad.lerp(buf, group["momentum"])
        update = orthogonalize(nesterov).to(p.dtype)
        scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
        p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
