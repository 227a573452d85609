"""ReLU routing (ReMoE, Wang et al., ICLR 2025, arXiv 2412.14711): gates = ReLU(W x), no top-k.

A token goes to every expert whose gate is positive, weighted by the gate itself, so the router is
differentiable everywhere a gate is (no top-k cut) and a token takes a variable number of experts; a zero
gate makes no assignment, so its expert is never computed. Sparsity comes from an L1 penalty on the gates
whose coefficient lambda adapts once per optimizer step to hold the target of ``top_k`` active experts per
token on average (sparsity 1 - k/E):

    lambda <- lambda * alpha ** sign((1 - k/E) - observed sparsity)

With ``relu_l1_balanced`` (ReMoE's default) the L1 of expert e is weighted by its load f_e = E/(k*T) *
#tokens routed to e (detached), which pushes the gates of overloaded experts down harder. Both terms are
ratios of batch sums (:func:`l1_sums`, :func:`l1_loss`), reduced over ranks like the other balancing losses.

Where moekit chooses: each MoE layer holds its own lambda (a buffer, saved in checkpoints) and holds its own
sparsity at the target, where the paper adapts one lambda to the sparsity averaged over layers (so layers may
differ there); the L1 is a mean over tokens, summed over experts (not divided by E), and each layer's term
enters the model's aux loss (a sum over layers, the paper's is a mean: a constant factor lambda absorbs). The
observed sparsity is that of the whole optimizer step: every micro-batch, every rank. lambda_0 = 1e-8 and
alpha = 1.2 are the paper's defaults.

Shape legend: T tokens, D hidden, E experts, A assignments.
"""

from __future__ import annotations

import torch

from moekit.errors import ShapeError
from moekit.nn.config import MoEConfig
from moekit.nn.router import Router
from moekit.nn.routing import Routing


class ReLURouter(Router):
    """ReMoE routing: gates ReLU(W x) in fp32; each positive gate is an assignment weighted by that gate."""

    l1_coef: torch.Tensor  # buffers, registered in __init__
    load_since_update: torch.Tensor
    tokens_since_update: torch.Tensor

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        # The adaptive L1 coefficient lambda: persistent, so a resumed run keeps its sparsity pressure.
        self.register_buffer("l1_coef", torch.tensor(config.relu_l1_init, dtype=torch.float32))
        # Assignments per expert and routed tokens since the last update_bias(), summed over micro-batches by the
        # MoE layer in training (over all ranks when distributed): the observed sparsity the update reads.
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)
        self.register_buffer("tokens_since_update", torch.zeros(()), persistent=False)

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, token_ids_T: torch.Tensor | None = None
    ) -> Routing:
        logits_TE = self.logits(x_TD)
        return self.assign(logits_TE, logits_TE > 0, valid_T)

    def assign(self, logits_TE: torch.Tensor, chosen_TE: torch.Tensor, valid_T: torch.Tensor | None) -> Routing:
        """The Routing that sends token t to expert e where ``chosen_TE`` (its positive gates, or a replayed
        record), weighted by the gate ReLU(logit); padding (``valid_T`` False) goes nowhere."""
        gates_TE = logits_TE.relu()
        if valid_T is not None:
            chosen_TE = chosen_TE & valid_T.unsqueeze(1)
        token_idx_A, expert_idx_A = chosen_TE.nonzero(as_tuple=True)  # token-major, experts ascending
        # A token's assignments ranked by falling gate (ties to the lower expert), as top-k routers rank theirs.
        rank_TE = gates_TE.detach().argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        total_T = gates_TE.sum(dim=-1, keepdim=True)
        return Routing(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=gates_TE[token_idx_A, expert_idx_A],
            choice_rank_A=rank_TE[token_idx_A, expert_idx_A],
            logits_TE=logits_TE,
            # The gates as a distribution (for the entropy and the routing report); a token without experts is 0.
            probs_TE=gates_TE / total_T.clamp_min(1e-20),
            num_tokens=logits_TE.shape[0],
            valid_T=valid_T,
        )

    @torch.no_grad()
    def observe(self, routing: Routing, num_valid: int, gather: object = None) -> None:
        """Count a training batch's routed tokens (of the global batch; the MoE layer sums the load beside)."""
        self.tokens_since_update += num_valid

    def sparsity(self) -> float:
        """Observed fraction of (token, expert) pairs with a zero gate since the last update (nan: none seen)."""
        cells = float(self.tokens_since_update) * self.config.num_experts
        return 1.0 - float(self.load_since_update.sum()) / cells if cells > 0 else float("nan")

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """One adaptive step of the L1 coefficient from the sparsity observed in training since the last call
        (the MoE layer accumulates it, over all ranks when distributed), then reset that observation."""
        if load_E is not None:
            raise ShapeError(
                "router='relu' adapts its L1 coefficient from the sparsity it observed in training; "
                "call update_bias() / update_router_biases() without loads"
            )
        cfg = self.config
        if self.tokens_since_update > 0:
            target = 1.0 - cfg.top_k / cfg.num_experts
            direction = (target > self.sparsity()) - (target < self.sparsity())  # sign(target - observed)
            self.l1_coef.mul_(cfg.relu_l1_alpha**direction)
        self.load_since_update.zero_()
        self.tokens_since_update.zero_()


def l1_sums(routing: Routing) -> dict[str, torch.Tensor]:
    """The batch sums of the L1 loss: ``gates_E``, the gates of the routed tokens summed per expert (with grad)."""
    assert routing.logits_TE is not None, "the relu router keeps its logits"
    gates_TE = routing.logits_TE.relu()
    if routing.valid_T is not None:
        gates_TE = gates_TE[routing.valid_T]
    return {"gates_E": gates_TE.sum(dim=0)}


def l1_loss(sums: dict[str, torch.Tensor], config: MoEConfig) -> torch.Tensor:
    """ReMoE's L1 penalty: the mean over routed tokens of sum_e w_e * gate_e, where w_e is 1, or with
    ``relu_l1_balanced`` the load f_e = E / (k T) * #tokens routed to e (1 at a balanced load at the target)."""
    n = sums["n_valid"].clamp(min=1)
    gates_E = sums["gates_E"]
    if not config.relu_l1_balanced:
        return gates_E.sum() / n
    load_E = sums["routed_E"].detach() * config.num_experts / (config.top_k * n)
    return (load_E.to(gates_E.dtype) * gates_E).sum() / n
