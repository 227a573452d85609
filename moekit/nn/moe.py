"""The MoE layer (router -> dispatch -> experts -> combine, plus shared experts) and
:func:`reference_moe`, the slow loop every fast path is tested against.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, N kept assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moekit.errors import ConfigError, ShapeError
from moekit.nn import few_tokens
from moekit.nn.config import Activation, BalanceScope, MoEConfig, RouterType
from moekit.nn.dispatch import Dispatch, dispatch, expert_capacity
from moekit.nn.executor import ExpertExecutor, LocalExperts, SharedWeights
from moekit.nn.experts import Experts
from moekit.nn.kernels.schedule import intra_op_threads
from moekit.nn.losses import losses_from_sums, routing_sums
from moekit.nn.mlp import MLP
from moekit.nn.relu_router import l1_loss, l1_sums
from moekit.nn.router import TopKRouter, token_choice
from moekit.nn.router_registry import build_router
from moekit.nn.routing import MoEAux, Routing
from moekit.nn.zero_experts import GatingResidual, ZeroComputationExperts, skipped_tokens, split_routing, weigh_balance

# Routers whose balance is not guaranteed by construction, and so take the balancing losses.
_BALANCED_BY_LOSS = (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Build from a :class:`MoEConfig` and the model's ``hidden_size``, or from its fields as keywords::

        layer = MoE(config, hidden_size=64)
        layer = MoE(hidden_size=64, num_experts=8, top_k=2, expert_hidden_size=128)
        y, aux = layer(x)          # x: [batch, seq, hidden] or [tokens, hidden]
        loss = task_loss + aux.loss

    Args of forward:
        x: [B, S, D] or [T, D].
        mask: optional padding mask of x's leading shape (True/1 = real token). Masked tokens are
            not routed (their output is zero, so the residual carries them) and do not count in
            the balancing losses or statistics.
        token_ids: token ids of x's leading shape; required by hash routing.
        record_routing: keep the full Routing in ``aux.routing`` (for analysis).
        prev_logits: the previous MoE layer's ``aux.gate_logits``; required with ``gating_residual``.
    """

    def __init__(self, config: MoEConfig | None = None, *, hidden_size: int, **fields: Any):
        super().__init__()
        if config is None:
            config = MoEConfig.from_dict(fields)
        elif fields:
            config = config.replace(**fields)
        self.config, self.hidden_size = config, hidden_size
        self.router = build_router(config, hidden_size)
        self.experts = Experts(config.num_experts, hidden_size, config.expert_hidden_size, config.activation)
        self.shared_experts = (
            MLP(hidden_size, config.shared_hidden_size, config.activation) if config.num_shared_experts else None
        )
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if config.num_shared_experts and config.shared_expert_gate else None
        )
        # MoE++ (moekit.nn.zero_experts): zero/copy/constant experts beside the FFN experts; gating residual.
        self.zero_computation = ZeroComputationExperts(config, hidden_size) if config.num_zero_computation else None
        self.gating_residual = GatingResidual(config.num_candidates) if config.gating_residual else None
        # Runs the experts and sums the statistics over a global batch; moekit.distributed.shard_model
        # replaces it (this rank then holds E / P experts; tokens travel to them by all-to-all).
        self.executor: ExpertExecutor = LocalExperts()
        # Set by moekit.nn.replay.RouterReplay while it records or replays this layer's expert choices.
        self.replay: Callable[..., Routing] | None = None
        # aux_loss_scope="global" (read-only state): the sums (assignments per expert, tokens, router probabilities;
        # over ranks) of the micro-batches since reset_balance_window(), which the training loop calls each step.
        self.balance_window: dict[str, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router.value}, experts={c.num_experts}, top_k={c.top_k}, shared={c.num_shared_experts}"

    # -- input checks -------------------------------------------------------------------------
    def _flatten_inputs(
        self, x: torch.Tensor, mask: torch.Tensor | None, token_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        if x.dim() not in (2, 3):
            raise ShapeError(f"x must be [batch, seq, hidden] or [tokens, hidden], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.hidden_size:
            raise ShapeError(f"x has hidden size {x.shape[-1]} but the layer's hidden_size={self.hidden_size}")
        lead = tuple(x.shape[:-1])
        valid_T = None
        if mask is not None:
            if tuple(mask.shape) != lead:
                raise ShapeError(f"mask has shape {tuple(mask.shape)} but x's leading shape is {lead}")
            valid_T = mask.reshape(-1).bool()
        ids_T = None
        if token_ids is not None:
            if tuple(token_ids.shape) != lead:
                raise ShapeError(f"token_ids has shape {tuple(token_ids.shape)} but x's leading shape is {lead}")
            ids_T = token_ids.reshape(-1)
        if self.config.router == RouterType.HASH and ids_T is None:
            raise ShapeError("router='hash' needs token_ids (the input ids of the tokens) in forward()")
        seq_len = x.shape[1] if x.dim() == 3 else x.shape[0]
        return x.reshape(-1, x.shape[-1]), valid_T, ids_T, seq_len

    # -- forward ------------------------------------------------------------------------------
    def route(
        self,
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        token_ids_T: torch.Tensor | None = None,
        prev_logits: torch.Tensor | None = None,
    ) -> Routing:
        """The router's decision for flattened tokens (plus the previous layer's logits with a gating residual)."""
        if self.gating_residual is None:
            return self.router(x_TD, valid_T, token_ids_T)
        if prev_logits is None or prev_logits.numel() // prev_logits.shape[-1] != x_TD.shape[0]:
            got = "none" if prev_logits is None else f"shape {tuple(prev_logits.shape)}"
            raise ShapeError(
                f"gating_residual=True needs prev_logits, the previous MoE layer's aux.gate_logits for the same "
                f"{x_TD.shape[0]} tokens; got {got}"
            )
        router = self.router
        assert isinstance(router, TopKRouter), "MoEConfig admits top-k routers only with gating_residual"
        logits_TN = router.logits(x_TD)
        logits_TN = logits_TN + self.gating_residual(prev_logits.reshape(-1, prev_logits.shape[-1]).to(logits_TN))
        topk_idx_TK, weight_TK, probs_TN = router.choose(logits_TN)
        return token_choice(topk_idx_TK, weight_TK, logits_TN, probs_TN, valid_T)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        record_routing: bool = False,
        prev_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        moe_pp = self.zero_computation is not None or self.gating_residual is not None
        if not moe_pp and few_tokens.applies(self, x, mask, record_routing):
            return few_tokens.forward(self, x)
        if self.replay is not None and moe_pp:
            raise ConfigError("router replay does not support MoE++ layers (zero-computation experts, gating_residual)")
        cfg = self.config
        threads = torch.get_num_threads()
        # The many small ops run on one intra-op thread (see moekit.nn.kernels.schedule.intra_op_threads);
        # the experts (and shared experts) spread over `threads` single-threaded workers.
        with intra_op_threads(1):
            x_TD, valid_T, ids_T, seq_len = self._flatten_inputs(x, mask, token_ids)
            if self.replay is None:
                routing = self.route(x_TD, valid_T, ids_T, prev_logits)
            else:
                routing = self.replay(self, tuple(x.shape[:-1]), x_TD, valid_T, ids_T)
            ffn_routing, extra = (
                (routing, None) if self.zero_computation is None else split_routing(routing, cfg.num_experts)
            )
            plan = dispatch(ffn_routing, cfg.num_experts, cfg.capacity_factor, cfg.drop_policy)
            fuse = self.executor.fuses_shared and self.experts.fused_kernel
            shared = self._fusable_shared(x_TD) if fuse else None
            dropout = cfg.expert_dropout if self.training else 0.0
            y_TD = self.executor(x_TD, plan, self.experts, dropout=dropout, shared=shared, threads=threads)
        if self.shared_experts is not None and shared is None:
            y_TD = y_TD + self.shared_output(x_TD).to(y_TD.dtype)
        with intra_op_threads(1):
            if self.zero_computation is not None and extra is not None:  # no FFN runs for these assignments
                y_TD = y_TD + self.zero_computation(x_TD, extra).to(y_TD.dtype)
            y_TD = y_TD.to(x.dtype)
            aux = self._aux(routing, plan, seq_len, record_routing)
        return y_TD.view(x.shape), aux

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output for x_TD (gated when the layer has a shared-expert gate)."""
        assert self.shared_experts is not None, "called only when the layer has shared experts"
        shared_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    def _fusable_shared(self, x_TD: torch.Tensor) -> SharedWeights | None:
        """(w_in, w_out, weight_T) of the shared experts for the fused kernel, or None when there are none or
        the shared MLP (or its gate) is not the stock module (hooks, adapters), which then runs as is."""
        mlp, gate = self.shared_experts, self.shared_expert_gate
        if mlp is None or type(mlp) is not MLP or (gate is not None and type(gate) is not nn.Linear):
            return None
        mods = [mlp, *mlp.children(), *([gate] if gate is not None else [])]
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in mods)
        if hooked or any(type(m) is not nn.Linear or m.bias is not None for m in mlp.children()):
            return None
        if mlp.activation == Activation.SWIGLU:
            w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()
        else:
            w_in = mlp.up_proj.weight.t()
        weight_T = None if gate is None else torch.sigmoid(gate(x_TD)).squeeze(-1)
        return w_in, mlp.down_proj.weight.t(), weight_T

    def _aux(self, routing: Routing, plan: Dispatch, seq_len: int, record_routing: bool) -> MoEAux:
        """Losses and statistics of the global batch: this batch's sums, summed by the executor, then ratios."""
        c = self.config
        coefs = {"aux": c.aux_loss_coef, "seq_aux": c.seq_aux_loss_coef, "z": c.z_loss_coef}
        if c.router not in _BALANCED_BY_LOSS:
            coefs["aux"] = coefs["seq_aux"] = 0.0
        N = c.num_candidates  # the FFN experts, then MoE++'s zero-computation ones (if any)
        sums = routing_sums(routing, N, seq_len, [name for name, coef in coefs.items() if coef > 0])
        sums.update(kept_E=plan.tokens_per_expert_E, dropped_assignments=plan.dropped_assignments)
        sums.update(dropped_tokens=plan.dropped_tokens)
        relu = c.router == RouterType.RELU
        if relu:
            sums.update(l1_sums(routing))
        if c.num_zero_computation:
            sums["ffn_skipped"] = skipped_tokens(routing, c.num_experts)
        sums = self.executor.reduce(sums)
        load_E = getattr(self.router, "load_since_update", None)
        if self.router.training and isinstance(load_E, torch.Tensor):
            with torch.no_grad():  # the load the aux-loss-free bias update balances (global under EP)
                load_E += sums["routed_E"].to(load_E.dtype)
        # A router's view of each training batch (global under EP): expert threshold moves its thresholds, relu
        # counts the tokens its sparsity is measured over.
        observe = getattr(self.router, "observe", None)
        if self.router.training and observe is not None:
            observe(routing, int(sums["n_valid"]), self.executor.gather)
        if c.num_zero_computation and "probs_E" in sums:
            sums["probs_E"] = weigh_balance(sums["probs_E"], c)
        losses = losses_from_sums(sums, N)
        if "aux" in losses and c.aux_loss_scope == BalanceScope.GLOBAL and self.training:
            losses["aux"] = self._global_batch_aux(sums)
        loss = sum((coefs[name] * value for name, value in losses.items()), torch.zeros(()))
        if relu:  # ReMoE's L1 on the gates, at the coefficient the router adapts each step
            losses["l1"] = l1_loss(sums, c)
            loss = loss + self.router.get_buffer("l1_coef") * losses["l1"]
        zero_load = sums["routed_E"][c.num_experts :].round().long() if c.num_zero_computation else None
        return MoEAux(
            loss=loss,
            losses=losses,
            tokens_per_expert=sums["kept_E"],
            dropped_assignments=sums["dropped_assignments"],
            dropped_tokens=sums["dropped_tokens"],
            router_entropy=sums["entropy"] / sums["n_valid"].clamp(min=1),
            routing=routing if record_routing else None,
            zero_computation_load=zero_load,
            ffn_skipped_tokens=sums.get("ffn_skipped"),
            gate_logits=routing.logits_TE,
        )

    def _global_batch_aux(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """Global-batch balancing (Qwen, arXiv 2501.11873): E * sum_e f_e * P_e with P_e this micro-batch's mean
        router probability (the gradient's path) and f_e the share of expert e among the assignments of every
        micro-batch of the step so far, this one included (exact for the step's last micro-batch: the f of a
        micro-batch still to come cannot steer an earlier one's gradient; Megatron's global aux loss chooses alike)."""
        seen = {"routed_E": sums["routed_E"], "n_valid": sums["n_valid"], "probs_E": sums["probs_E"]}
        seen = {name: value.detach().to(torch.float64) for name, value in seen.items()}
        if self.balance_window is not None:
            seen = {name: value + self.balance_window[name] for name, value in seen.items()}
        self.balance_window = seen
        f_E = (seen["routed_E"] / seen["n_valid"].clamp(min=1)).to(sums["probs_E"].dtype)
        return self.config.num_candidates * (f_E * sums["probs_E"] / sums["n_valid"].clamp(min=1)).sum()

    def reset_balance_window(self) -> None:
        """Start a new global batch for ``aux_loss_scope="global"`` (the training loop calls it every step)."""
        self.balance_window = None

    def balance_window_loss(self) -> torch.Tensor | None:
        """The balancing loss of the micro-batches since the last reset, as if they were one batch (detached,
        fp64); None before the first training forward with ``aux_loss_scope="global"``."""
        w = self.balance_window
        if w is None:
            return None
        n = w["n_valid"].clamp(min=1)
        return self.config.num_candidates * ((w["routed_E"] / n) * (w["probs_E"] / n)).sum()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """Once per optimizer step: the aux-loss-free balancing step of a sigmoid router, the L1 coefficient step of
        a relu router (no-op for other routers)."""
        update_bias = getattr(self.router, "update_bias", None)  # duck-typed: custom routers may have one
        if update_bias is not None:
            update_bias(load_E)


def start_global_batch(model: nn.Module) -> None:
    """Reset every MoE layer's global-batch balancing window: call it before an optimizer step's micro-batches."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.reset_balance_window()


def reference_moe(
    layer: MoE,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    prev_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The obviously-right MoE output: the layer's own routing, then a plain loop over experts.

    Capacity is re-derived here with python sorting, so the fast dispatcher is checked too. Zero-computation
    experts (MoE++) are added token by token.
    """
    cfg = layer.config
    x_TD, valid_T, ids_T, _ = layer._flatten_inputs(x, mask, token_ids)
    routing = layer.route(x_TD, valid_T, ids_T, prev_logits)
    assignments = list(
        zip(
            routing.token_idx_A.tolist(),
            routing.expert_idx_A.tolist(),
            routing.choice_rank_A.tolist(),
            routing.weight_A.detach().tolist(),
        )
    )
    y_TD = torch.zeros_like(x_TD)
    for e in range(cfg.num_experts):
        mine = [(i, a) for i, a in enumerate(assignments) if a[1] == e]
        if cfg.capacity_factor is not None:
            cap = expert_capacity(cfg.capacity_factor, routing.num_valid_tokens(), routing.top_k or 1, cfg.num_experts)
            if cfg.drop_policy.value == "position":
                mine.sort(key=lambda ia: (ia[1][2], ia[1][0]))
            else:
                mine.sort(key=lambda ia: -ia[1][3])
            mine = mine[:cap]
        for i, (t, _, _, _) in mine:
            out_D = layer.experts.expert_forward(e, x_TD[t : t + 1])[0]
            y_TD[t] = y_TD[t] + routing.weight_A[i].to(x.dtype) * out_D
    for i, (t, e, _, _) in enumerate(assignments):
        if e >= cfg.num_experts:
            assert layer.zero_computation is not None, "only MoE++ layers route beyond the FFN experts"
            y_TD[t] = y_TD[t] + routing.weight_A[i].to(x.dtype) * layer.zero_computation.reference(x_TD[t], e)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_output(x_TD)
    return y_TD.view(x.shape)
