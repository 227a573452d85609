"""Sparse upcycling: a dense model -> an MoE whose experts start from the dense FFN.

Komatsuzaki et al. 2023 ("Sparse Upcycling"): every expert is a copy of the dense FFN and the
router is new, so with renormalised top-k weights the MoE computes the dense function at step 0.

Granular upcycling (He et al. 2024, "Upcycling LLMs into MoE", virtual-group init): the FFN's
intermediate dimension is cut into G shards; expert ``g*G + c`` holds shard c with its down
projection scaled by G, and the G experts of virtual group g share one router row. Their logits
tie, so top-k (k a multiple of G) picks whole groups, and with renormalised weights
``sum_groups w_g * G * sum_c shard_c(x) / G = dense(x)``: the function is preserved exactly.

Shared experts start as copies of the dense FFN too; shared and routed outputs are each scaled by
1/2 so that their sum is still the dense FFN. With a Qwen2-MoE shared-expert gate, the gate starts at
zero weight, so sigmoid(0) = 1/2 does the shared side's halving. Drop-Upcycling (Nakamura et al. 2025) re-initialises
a random fraction of each expert's intermediate neurons to break the experts' symmetry.

Shape legend: D hidden, F dense intermediate, H = F / G expert hidden, E experts, G granularity.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.models import LMConfig, MoELM
from moekit.nn import MLP, MoE, MoEConfig
from moekit.nn.config import Activation


def upcycle_config(
    dense: LMConfig,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    shared_experts: int = 0,
    router: str = "softmax_topk",
    aux_loss_coef: float = 0.01,
    shared_expert_gate: bool = False,
) -> LMConfig:
    """The MoE LMConfig that :func:`upcycle` builds from ``dense``."""
    if dense.moe is not None:
        raise ConfigError("upcycling starts from a dense model, but this model already has MoE layers")
    F = dense.intermediate_size
    if granularity < 1 or F % granularity:
        raise ConfigError(f"intermediate_size={F} is not divisible by granularity={granularity}")
    if num_experts % granularity:
        raise ConfigError(f"num_experts={num_experts} is not divisible by granularity={granularity}")
    if shared_expert_gate and not shared_experts:
        raise ConfigError("a shared-expert gate needs at least one shared expert (--shared-experts N)")
    if top_k > num_experts:
        raise ConfigError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if top_k % granularity:
        raise ConfigError(
            f"top_k={top_k} must be a multiple of granularity={granularity} so that whole virtual groups are chosen"
        )
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden_size=F // granularity,
        router=router,
        activation=dense.activation,
        num_shared_experts=shared_experts,
        shared_expert_hidden_size=F if shared_experts else None,
        shared_expert_gate=shared_expert_gate,
        norm_topk_prob=True,  # renormalised weights are what makes upcycling function-preserving
        aux_loss_coef=aux_loss_coef,
    )
    return dense.replace(moe=moe, first_k_dense=0, moe_layer_freq=1, moe_layers=None)


def _copy_expert(moe: MoE, e: int, mlp: MLP, neurons: slice = slice(None), down_scale: float = 1.0) -> None:
    """Expert ``e`` of ``moe`` := the ``neurons`` of ``mlp``'s intermediate dimension, its down projection scaled."""
    swiglu = moe.config.activation == Activation.SWIGLU
    up_FD = mlp.up_proj.weight[neurons]
    moe.experts.w_in[e].copy_(torch.cat([mlp.gate_proj.weight[neurons].t(), up_FD.t()] if swiglu else [up_FD.t()], -1))
    moe.experts.w_out[e].copy_(mlp.down_proj.weight[:, neurons].t() * down_scale)


@torch.no_grad()
def _upcycle_layer(mlp: MLP, moe: MoE, granularity: int, noise: float, reinit_fraction: float, generator) -> None:
    cfg = moe.config
    E, G, H = cfg.num_experts, granularity, cfg.expert_hidden_size
    shared_scale = 0.5 if cfg.num_shared_experts else 1.0
    down_DF = mlp.down_proj.weight * shared_scale
    for e in range(E):
        _copy_expert(moe, e, mlp, slice((e % G) * H, (e % G + 1) * H), G * shared_scale)
    if noise > 0:
        for w in (moe.experts.w_in, moe.experts.w_out):
            w.add_(torch.randn(w.shape, generator=generator) * noise * w.std())
    if reinit_fraction > 0:
        _drop_upcycle(moe, reinit_fraction, generator)
    # Virtual groups: the G shards of group g share one router row, so their logits tie.
    rows = torch.randn(E // G, moe.hidden_size, generator=generator) * moe.hidden_size**-0.5
    moe.router.weight.copy_(rows.repeat_interleave(G, dim=0))
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                getattr(shared, name).weight.copy_(torch.cat([getattr(mlp, name).weight] * cfg.num_shared_experts))
        # A zero-weight gate gives sigmoid(0) = 1/2, which already halves the shared output.
        down_shared_DF = mlp.down_proj.weight if moe.shared_expert_gate is not None else down_DF
        shared.down_proj.weight.copy_(
            torch.cat([down_shared_DF] * cfg.num_shared_experts, dim=1) / cfg.num_shared_experts
        )
        if moe.shared_expert_gate is not None:
            nn.init.zeros_(moe.shared_expert_gate.weight)


def _drop_upcycle(moe: MoE, fraction: float, generator) -> None:
    """Re-initialise a random ``fraction`` of each expert's intermediate neurons (Drop-Upcycling)."""
    experts = moe.experts
    E, H = experts.num_experts, experts.expert_hidden_size
    glu = experts.activation == Activation.SWIGLU
    n = round(fraction * H)
    std_in, std_out = experts.w_in.std().item(), experts.w_out.std().item()
    for e in range(E):
        idx = torch.randperm(H, generator=generator)[:n]
        cols = torch.cat([idx, idx + H]) if glu else idx
        experts.w_in[e][:, cols] = torch.randn(experts.hidden_size, len(cols), generator=generator) * std_in
        experts.w_out[e][idx] = torch.randn(n, experts.hidden_size, generator=generator) * std_out


def upcycle(
    dense: MoELM,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    noise: float = 0.0,
    shared_experts: int = 0,
    reinit_fraction: float = 0.0,
    router: str = "softmax_topk",
    seed: int = 0,
    shared_expert_gate: bool = False,
) -> MoELM:
    """An MoE copy of the dense MoELM ``dense`` (moekit's, or imported by :func:`moekit.from_hf`) whose every expert
    starts from the dense FFN; attention, embeddings and norms are copied unchanged.

    ``granularity`` G cuts the FFN into G finer experts of intermediate size F / G (``num_experts`` and ``top_k``
    are multiples of G). ``noise`` is the relative std of Gaussian noise added to the expert weights (0 keeps the
    dense function); ``shared_experts`` are copies of the dense FFN too, with a Qwen2-MoE sigmoid gate when
    ``shared_expert_gate`` (needed to export as qwen2_moe); ``reinit_fraction`` is Drop-Upcycling's share of
    neurons re-initialised per expert; ``router`` is ``softmax_topk`` or ``sigmoid_topk``; ``seed`` draws the
    router rows, noise and re-initialisation.
    """
    if not 0 <= reinit_fraction <= 1:
        raise ConfigError(f"reinit_fraction must be in [0, 1], got {reinit_fraction}")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    config = upcycle_config(
        dense.config, num_experts, top_k, granularity, shared_experts, router, shared_expert_gate=shared_expert_gate
    )
    moe_model = MoELM(config).to(next(dense.parameters()).dtype)
    generator = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    own = moe_model.state_dict()
    with torch.no_grad():
        for name, tensor in dense_state.items():
            if ".mlp." not in name and name in own:
                own[name].copy_(tensor)
    for i, block in enumerate(moe_model.layers):
        dense_mlp = dense.layers[i].mlp
        if not isinstance(dense_mlp, MLP) or not hasattr(dense_mlp, "down_proj"):
            raise ConfigError(f"layer {i} of the dense model has no recognisable FFN (got {type(dense_mlp).__name__})")
        _upcycle_layer(dense_mlp, block.mlp, granularity, noise, reinit_fraction, generator)
    return moe_model


def check_same_architecture(models: list[MoELM]) -> None:
    """Raise ConfigError naming the first field in which the models differ (BTX needs equal shapes)."""
    first = models[0].config.to_dict()
    for n, model in enumerate(models[1:], start=2):
        other = model.config.to_dict()
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "moe",
            "activation",
        ):
            if first.get(key) != other.get(key):
                raise ConfigError(
                    f"models 1 and {n} cannot be mixed: {key} is {first.get(key)!r} vs {other.get(key)!r}"
                )


def mix_experts(dense_models: list[MoELM], top_k: int = 2, seed: int = 0, router: str = "softmax_topk") -> MoELM:
    """Branch-Train-MiX's mix step (Sukhbaatar et al. 2024): each domain model's FFN becomes an expert.

    ``dense_models`` are fine-tuned copies of one seed model (identical architecture, no MoE); ``top_k`` is capped
    at their number. Attention, embeddings and norms are their average; router rows are new (train them with
    router-only training next).
    """
    if len(dense_models) < 2:
        raise ConfigError(f"mixing needs at least 2 dense models, got {len(dense_models)}")
    check_same_architecture(dense_models)
    base = dense_models[0].config
    if base.moe is not None:
        raise ConfigError("Branch-Train-MiX mixes dense models; model 1 already has MoE layers")
    config = upcycle_config(base, len(dense_models), min(top_k, len(dense_models)), router=router)
    mixed = MoELM(config)
    own = mixed.state_dict()
    states = [m.state_dict() for m in dense_models]
    with torch.no_grad():
        for name in states[0]:
            if ".mlp." not in name and name in own:
                own[name].copy_(torch.stack([s[name].float() for s in states]).mean(0).to(own[name].dtype))
        generator = torch.Generator().manual_seed(seed)
        for i, block in enumerate(mixed.layers):
            moe = block.mlp
            for e, model in enumerate(dense_models):
                _copy_expert(moe, e, model.layers[i].mlp)
            moe.router.weight.copy_(
                torch.randn(moe.router.weight.shape, generator=generator) * config.hidden_size**-0.5
            )
    return mixed
