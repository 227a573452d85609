"""MoEConfig: every knob of one MoE layer, validated at construction."""

from __future__ import annotations

import dataclasses
import enum
import logging

from moekit.config import Config, check_choice, require

logger = logging.getLogger(__name__)


class RouterType(str, enum.Enum):
    SOFTMAX_TOPK = "softmax_topk"  # Switch (k=1), GShard/Mixtral (k=2), OLMoE/Qwen (k=8)
    SIGMOID_TOPK = "sigmoid_topk"  # DeepSeek-V3: sigmoid scores, aux-free bias, group-limited
    EXPERT_CHOICE = "expert_choice"  # Zhou et al. 2022: each expert picks its top-C tokens
    HASH = "hash"  # Roller et al. 2021: a fixed token-id -> expert map
    DENSE = "dense"  # Jacobs et al. 1991: every expert runs, softmax weights
    EXPERT_THRESHOLD = "expert_threshold"  # Sun et al. 2026: experts whose running score threshold a token passes
    RELU = "relu"  # ReMoE (arXiv 2412.14711): ReLU gates, sparsity held by an adaptive L1 penalty


class BalanceScope(str, enum.Enum):
    """Over which tokens the balancing loss counts each expert's share of the assignments (its f_e).

    micro: the tokens of one forward pass (every rank of it under data/expert parallelism).
    global: every micro-batch of the optimizer step as well (Qwen, arXiv 2501.11873): a sequence may specialise,
    since only the whole global batch must be balanced.
    """

    MICRO = "micro"
    GLOBAL = "global"


class Activation(str, enum.Enum):
    SWIGLU = "swiglu"
    GELU = "gelu"


class DropPolicy(str, enum.Enum):
    """Which assignments an over-full expert keeps when a capacity factor is set.

    position: first choices before second choices, then earlier tokens first (GShard's order).
    score: the assignments with the highest routing weight first (BPR, Riquelme et al. 2021).
    """

    POSITION = "position"
    SCORE = "score"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(Config):
    """Configuration of one MoE layer.

    Field names follow Hugging Face where a counterpart exists (``norm_topk_prob``, ``n_group``,
    ``topk_group``, ``routed_scaling_factor``).
    """

    num_experts: int
    top_k: int = 2
    expert_hidden_size: int
    router: RouterType = RouterType.SOFTMAX_TOPK
    activation: Activation = Activation.SWIGLU
    # Shared experts: always-on experts, fused into one MLP of num_shared_experts * shared size.
    num_shared_experts: int = 0
    shared_expert_hidden_size: int | None = None  # default: expert_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared output
    # Capacity: None = dropless. Expert capacity = ceil(capacity_factor * T * k / E).
    capacity_factor: float | None = None
    drop_policy: DropPolicy = DropPolicy.POSITION
    # Token-choice routers.
    norm_topk_prob: bool | None = True  # renormalise the k chosen weights to sum to 1; None: only when top_k > 1
    router_jitter: float = 0.0  # Switch: multiply router input by U(1-eps, 1+eps) in training
    # Switch's "expert dropout": dropout on the routed experts' hidden activations, in training only
    # (regularises the experts' extra capacity without slowing the rest of the model).
    expert_dropout: float = 0.0
    # Sigmoid router (DeepSeek-V3).
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3  # gamma of aux-loss-free balancing; 0 disables the update
    # Expert choice: capacity per expert = ceil(expert_choice_capacity * T / E).
    expert_choice_capacity: float = 2.0
    # Expert-threshold routing: decay of each expert's running score threshold (top_k: the experts per token
    # the thresholds aim at, on average).
    threshold_decay: float = 0.99
    # ReLU routing (ReMoE): top_k is the target *average* experts per token; the L1 coefficient starts at
    # relu_l1_init and is multiplied or divided by relu_l1_alpha each optimizer step to hold that target.
    relu_l1_init: float = 1e-8
    relu_l1_alpha: float = 1.2
    relu_l1_balanced: bool = True  # weigh each expert's L1 by its load (ReMoE's load-balancing L1)
    # Hash routing: seed of the fixed token-id -> expert map.
    hash_seed: int = 0
    # Balancing losses (coefficients; 0 disables). Computed in fp32 from the router logits.
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-level balance loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    aux_loss_scope: BalanceScope = BalanceScope.MICRO  # the aux loss's expert shares over a micro or global batch
    router_bias: bool = False  # a bias in the router's linear layer
    # MoE++ (Jin et al., ICLR 2025, arXiv 2410.07348): zero-computation experts scored beside the FFN experts
    # (moekit.nn.zero_experts). zero: adds nothing; copy: adds x; constant: adds a1*x + a2*v, v learned.
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    zero_expert_balance_weight: float = 0.75  # MoE++'s tau: their weight in the aux loss (FFN experts: 1)
    gating_residual: bool = False  # router logits += W_g @ (previous MoE layer's router logits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", check_choice("router", self.router, RouterType))
        object.__setattr__(self, "activation", check_choice("activation", self.activation, Activation))
        object.__setattr__(self, "drop_policy", check_choice("drop_policy", self.drop_policy, DropPolicy))
        object.__setattr__(self, "aux_loss_scope", check_choice("aux_loss_scope", self.aux_loss_scope, BalanceScope))
        if self.norm_topk_prob is None:  # a renormalised top-1 weight is always 1: Switch scales by the gate instead
            object.__setattr__(self, "norm_topk_prob", self.top_k > 1)
        for name in ("num_experts", "expert_hidden_size", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        self._check_zero_computation()
        if self.router in (
            RouterType.SOFTMAX_TOPK,
            RouterType.SIGMOID_TOPK,
            RouterType.EXPERT_THRESHOLD,
            RouterType.RELU,
        ):
            require(
                self.top_k <= self.num_candidates,
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}"
                + (f" + {self.num_zero_computation} zero-computation experts" if self.num_zero_computation else ""),
            )
        require(
            self.num_experts % self.n_group == 0,
            f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}",
        )
        require(
            self.topk_group <= self.n_group,
            f"topk_group={self.topk_group} exceeds n_group={self.n_group}",
        )
        if self.router == RouterType.SIGMOID_TOPK and self.n_group > 1:
            per_group = self.num_experts // self.n_group
            require(
                self.top_k <= self.topk_group * per_group,
                f"top_k={self.top_k} exceeds the {self.topk_group} groups x {per_group} experts "
                "that group-limited routing can choose from",
            )
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
            require(
                self.router
                not in (RouterType.EXPERT_CHOICE, RouterType.DENSE, RouterType.EXPERT_THRESHOLD, RouterType.RELU),
                f"capacity_factor applies to token-choice top-k routers, not router={self.router.value!r} "
                "(expert_choice sets its capacity with expert_choice_capacity; expert_threshold balances by its "
                "thresholds; dense and relu drop nothing)",
            )
        require(self.expert_choice_capacity > 0, "expert_choice_capacity must be > 0")
        require(0 <= self.threshold_decay < 1, f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        require(self.relu_l1_init > 0, f"relu_l1_init must be > 0, got {self.relu_l1_init}")
        require(self.relu_l1_alpha >= 1, f"relu_l1_alpha must be >= 1, got {self.relu_l1_alpha}")
        require(self.router_jitter >= 0, f"router_jitter must be >= 0, got {self.router_jitter}")
        require(0 <= self.expert_dropout < 1, f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.router == RouterType.SOFTMAX_TOPK and self.top_k == 1 and self.norm_topk_prob:
            # Allowed (checkpoints may say so), but a renormalised top-1 weight is always 1.
            logger.warning(
                "top_k=1 with norm_topk_prob=True: the chosen expert's weight is always 1, so the router "
                "learns only from the balancing losses; set norm_topk_prob=False to scale by the gate (Switch)"
            )

    def _check_zero_computation(self) -> None:
        """MoE++'s extra candidates and gating residual: top-k routers only, no expert groups."""
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        require(self.zero_expert_balance_weight >= 0, "zero_expert_balance_weight must be >= 0")
        if not (self.num_zero_computation or self.gating_residual):
            return
        what = "zero-computation experts" if self.num_zero_computation else "gating_residual"
        require(
            self.router in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK),
            f"{what} (MoE++) need router='softmax_topk' or 'sigmoid_topk', not {self.router.value!r}",
        )
        require(self.n_group == 1 or not self.num_zero_computation, f"{what} do not combine with n_group > 1")

    @property
    def num_zero_computation(self) -> int:
        """Zero, copy and constant experts together (MoE++)."""
        return self.zero_experts + self.copy_experts + self.constant_experts

    @property
    def num_candidates(self) -> int:
        """What the router scores: the FFN experts, then the zero, copy and constant experts."""
        return self.num_experts + self.num_zero_computation

    @property
    def experts_per_token(self) -> int:
        """How many routed experts process each token (on average for expert choice and expert threshold; the
        target average for relu)."""
        if self.router == RouterType.DENSE:
            return self.num_experts
        if self.router == RouterType.HASH:
            return 1
        if self.router == RouterType.EXPERT_CHOICE:
            return max(1, round(self.expert_choice_capacity))
        return self.top_k

    @property
    def shared_hidden_size(self) -> int:
        """Hidden size of the fused shared-expert MLP (0 when there is none)."""
        size = self.shared_expert_hidden_size or self.expert_hidden_size
        return self.num_shared_experts * size
