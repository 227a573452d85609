"""LoRA (Hu et al. 2021, arXiv 2106.09685) on linear layers and on stacked experts.

A frozen weight W gets a trainable low-rank update: y = x W^T + (alpha / r) * B A dropout(x), with A [r, in]
drawn small and B [out, r] zero, so an adapted model starts equal to its base. For the experts every expert
has its own pair, stacked like the weights (A [E, r, in], B [E, out, r]) and run by the same grouped GEMM
as the experts (two small grouped GEMMs per projection, no Python loop over experts). The adapted modules
keep their weights' names (``q_proj.weight``, ``experts.w_in``) and add ``lora_*`` parameters beside them, so
a checkpoint's keys do not move; :func:`merge_lora` folds the update into the weights and puts the plain
modules back.

Shape legend: N rows sorted by expert, E experts, D hidden, H expert hidden, X = 2H (SwiGLU) or H, r rank.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import Config, check_choice, require
from moekit.errors import CheckpointError, ConfigError
from moekit.io.safe_io import load_tensors, save_tensors
from moekit.nn.attention import Attention
from moekit.nn.experts import Experts
from moekit.nn.kernels.fused_experts import activate
from moekit.nn.kernels.grouped_mm import grouped_mm
from moekit.nn.mla import MultiHeadLatentAttention
from moekit.nn.mlp import MLP
from moekit.nn.moe import MoE

ADAPTER_FILE = "adapter.safetensors"  # beside a checkpoint's model.safetensors; its header holds the LoRAConfig
_ADAPTER_META = "moekit_lora"


class LoRATarget(str, enum.Enum):
    """Which modules get adapters."""

    ATTENTION = "attention"  # every projection of the attention (q/k/v/o, MLA's latent projections)
    EXPERTS = "experts"  # the routed experts' stacked w_in and w_out
    SHARED_EXPERTS = "shared_experts"  # the shared experts' projections
    DENSE_MLP = "dense_mlp"  # the FFN of dense blocks (first_k_dense, or a dense model)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(Config):
    """Rank, scale, dropout and targets of the adapters :func:`apply_lora` adds."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (training only)
    targets: tuple[str, ...] = ("attention", "experts", "shared_experts")

    def __post_init__(self) -> None:
        require(isinstance(self.rank, int) and self.rank >= 1, f"lora rank must be an integer >= 1, got {self.rank}")
        require(0 <= self.dropout < 1, f"lora dropout must be in [0, 1), got {self.dropout}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        require(len(targets) > 0, "lora targets is empty: name at least one of " + _target_names())
        object.__setattr__(self, "targets", tuple(check_choice("targets", t, LoRATarget).value for t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _target_names() -> str:
    return ", ".join(t.value for t in LoRATarget)


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """B A dropout(x) for one matrix pair (A [r, in], B [out, r])."""
    return F.linear(F.linear(F.dropout(x, dropout, training), a.to(x.dtype)), b.to(x.dtype))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias``) plus a LoRA update: x W^T + b + scale * B A dropout(x)."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale, self.dropout = config.scale, config.dropout
        w = base.weight
        self.lora_A = nn.Parameter(w.new_empty(config.rank, base.in_features))
        self.lora_B = nn.Parameter(w.new_zeros(base.out_features, config.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = _low_rank(x, self.lora_A, self.lora_B, self.dropout, self.training)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight holds the update (the same bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype).detach())
        out.bias = self.bias
        return out


def grouped_low_rank(
    x_NI: torch.Tensor, a_ERI: torch.Tensor, b_EOR: torch.Tensor, counts: tuple[int, ...]
) -> torch.Tensor:
    """Per-expert B_e A_e x for rows sorted by expert: two grouped GEMMs of rank width ([N, r], then [N, O])."""
    r_NR = grouped_mm(x_NI, a_ERI.transpose(1, 2), counts)
    return grouped_mm(r_NR, b_EOR.transpose(1, 2), counts)


class LoRAExperts(Experts):
    """Stacked experts (the same ``w_in``/``w_out``) with a LoRA pair per expert on each projection.

    ``lora_in_A`` [E, r, D], ``lora_in_B`` [E, X, r] adapt ``w_in``; ``lora_out_A`` [E, r, H], ``lora_out_B``
    [E, D, r] adapt ``w_out``. They run outside the fused kernel (``fused_kernel = False``), on the grouped
    GEMM path of :class:`~moekit.nn.executor.ExpertExecutor`. ``trainable``: experts whose adapters train
    (ESFT + LoRA); the others' adapters get no gradient and stay zero.
    """

    fused_kernel = False
    lora_experts: torch.Tensor  # buffer, registered in __init__

    def __init__(self, base: Experts, config: LoRAConfig, experts: list[int] | None = None):
        if type(base) is not Experts:
            raise ConfigError(
                f"LoRA on experts needs plain stacked experts, not {type(base).__name__} (quantised or "
                "offloaded experts: load the model without them)"
            )
        nn.Module.__init__(self)
        self.activation = base.activation
        self.num_experts, self.hidden_size = base.num_experts, base.hidden_size
        self.expert_hidden_size = H = base.expert_hidden_size
        self.w_in, self.w_out = base.w_in, base.w_out
        self.scale, self.dropout = config.scale, config.dropout
        # Adapters for ``experts`` only (ESFT + LoRA): the others' pairs are zero and hold no parameter.
        chosen = list(range(base.num_experts)) if experts is None else sorted(set(experts))
        self.register_buffer("lora_experts", torch.tensor(chosen, dtype=torch.long, device=base.w_in.device))
        S, r, D, X, w = len(chosen), config.rank, base.hidden_size, base.w_in.shape[-1], base.w_in
        self.lora_in_A = nn.Parameter(w.new_empty(S, r, D))
        self.lora_in_B = nn.Parameter(w.new_zeros(S, X, r))
        self.lora_out_A = nn.Parameter(w.new_empty(S, r, H))
        self.lora_out_B = nn.Parameter(w.new_zeros(S, D, r))
        for a in (self.lora_in_A, self.lora_out_A):
            bound = 1 / math.sqrt(a.shape[-1])  # kaiming_uniform(a=sqrt(5)) of each expert's [r, in]
            nn.init.uniform_(a, -bound, bound)

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in_A, in_B, out_A, out_B) over all E experts: zero pairs for experts without adapters."""
        pairs = (self.lora_in_A, self.lora_in_B, self.lora_out_A, self.lora_out_B)
        if self.lora_experts.numel() == self.num_experts:
            return pairs
        idx = (self.lora_experts,)
        full = [p.new_zeros(self.num_experts, *p.shape[1:]).index_put(idx, p) for p in pairs]
        return full[0], full[1], full[2], full[3]

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward(self, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0) -> torch.Tensor:
        if torch.is_autocast_enabled(x_ND.device.type):
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        in_A, in_B, out_A, out_B = self._stacks()
        h_NX = grouped_mm(x_ND, self.w_in, counts)
        h_NX = h_NX + self.scale * grouped_low_rank(self._drop(x_ND), in_A, in_B, counts)
        a_NH = activate(h_NX, self.activation)
        if dropout > 0:
            a_NH = F.dropout(a_NH, dropout)
        out_ND = grouped_mm(a_NH, self.w_out, counts)
        return out_ND + self.scale * grouped_low_rank(self._drop(a_NH), out_A, out_B, counts)

    def run_one(self, e: int, x_1D: torch.Tensor) -> torch.Tensor:
        return self.expert_forward(e, x_1D)

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its rows with its adapters, plain autograd: the per-expert reference of :meth:`forward`."""
        in_A, in_B, out_A, out_B = self._stacks()
        h = x_nD @ self.w_in[e].to(x_nD.dtype)
        h = h + self.scale * _low_rank(x_nD, in_A[e], in_B[e], self.dropout, self.training)
        a = activate(h, self.activation)
        out = a @ self.w_out[e].to(x_nD.dtype)
        return out + self.scale * _low_rank(a, out_A[e], out_B[e], self.dropout, self.training)

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The updates of ``w_in`` [E, D, X] and ``w_out`` [E, H, D] in the stacks' layout (fp32)."""
        in_A, in_B, out_A, out_B = self._stacks()
        d_in = torch.bmm(in_B.float(), in_A.float()).transpose(1, 2) * self.scale
        d_out = torch.bmm(out_B.float(), out_A.float()).transpose(1, 2) * self.scale
        return d_in, d_out

    def merged(self) -> Experts:
        """Plain :class:`Experts` whose stacks hold the updates."""
        with torch.device("meta"):  # no init draw: the stacks are replaced
            out = Experts(self.num_experts, self.hidden_size, self.expert_hidden_size, self.activation)
        d_in, d_out = self.deltas()
        out.w_in = nn.Parameter((self.w_in.float() + d_in).to(self.w_in.dtype).detach())
        out.w_out = nn.Parameter((self.w_out.float() + d_out).to(self.w_out.dtype).detach())
        return out


def _targets_of(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module the targets name."""
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def linears(parent: nn.Module) -> None:
        found.extend((parent, n, m) for n, m in parent.named_children() if type(m) is nn.Linear)

    for module in model.modules():
        if isinstance(module, (Attention, MultiHeadLatentAttention)) and "attention" in targets:
            linears(module)
        elif isinstance(module, MoE):
            if "experts" in targets:
                found.append((module, "experts", module.experts))
            if "shared_experts" in targets and module.shared_experts is not None:
                linears(module.shared_experts)
        elif isinstance(module, MLP) and "dense_mlp" in targets and not _is_shared(model, module):
            linears(module)
    return found


def _is_shared(model: nn.Module, mlp: nn.Module) -> bool:
    return any(isinstance(m, MoE) and m.shared_experts is mlp for m in model.modules())


def apply_lora(model: nn.Module, config: LoRAConfig, experts: dict[str, list[int]] | None = None) -> list[str]:
    """Put adapters on the modules ``config.targets`` names, in place; returns their names. Freezes nothing.

    ``experts``: expert modules by name (``layers.1.mlp.experts``) -> the experts that get adapters; when given,
    expert modules it does not name get none (ESFT + LoRA)."""
    if any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules()):
        raise ConfigError("this model already has LoRA adapters (merge them first: moekit merge-adapter)")
    names = {id(m): n for n, m in model.named_modules()}
    adapted = []
    for parent, attr, module in _targets_of(model, config.targets):
        name = names[id(module)]
        wrapped: nn.Module
        if isinstance(module, Experts):
            if experts is not None and name not in experts:
                continue
            wrapped = LoRAExperts(module, config, None if experts is None else experts[name])
        else:
            assert isinstance(module, nn.Linear), "targets are linears or experts"
            wrapped = LoRALinear(module, config)
        wrapped.train(module.training)  # a new module starts in training mode; keep the model's mode
        setattr(parent, attr, wrapped)
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"lora targets {list(config.targets)} match no module of this model")
    return adapted


def load_lora(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Put the adapters of ``tensors`` (a :func:`lora_state_dict`) on ``model``, in place; returns their modules."""
    suffix = ".lora_experts"
    subsets = {k[: -len(suffix)]: v.tolist() for k, v in tensors.items() if k.endswith(suffix)}
    adapted = apply_lora(model, config, subsets or None)
    load_lora_tensors(model, tensors)
    return adapted


def load_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the adapter values ``tensors`` (a :func:`lora_state_dict`) into the adapters ``model`` already has."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(f"the adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise ConfigError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
        if key.endswith(".lora_experts") and not torch.equal(own[key].cpu(), value.cpu()):
            raise ConfigError(
                f"{key}: the adapter is for experts {value.tolist()}, the model's for {own[key].tolist()}"
            )
    model.load_state_dict(tensors, strict=False)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weights and put the plain modules back, in place; returns how many."""
    merged = 0
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, LoRAExperts)):
                setattr(parent, attr, child.merged())
                merged += 1
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their names in ``model.state_dict()`` (what an adapter file holds)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}


def save_adapter(model: nn.Module, config: LoRAConfig, path: str | Path) -> None:
    """Write the model's adapters (:func:`lora_state_dict`) with ``config`` in the file's header."""
    save_tensors(lora_state_dict(model), path, {_ADAPTER_META: json.dumps(config.to_dict())})


def read_adapter(path: str | Path, device: str | torch.device = "cpu") -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """(settings, tensors) of an adapter file written by :func:`save_adapter`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _ADAPTER_META not in meta:
        raise CheckpointError(f"{path} names no LoRA settings (not written by moekit finetune)")
    return LoRAConfig.from_dict(json.loads(meta[_ADAPTER_META])), load_tensors(path, device)
