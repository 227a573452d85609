"""The MoE causal language model, top to bottom.

    input_ids [B, S] -> embed_tokens -> [B, S, D]
                     -> layers[0..L): x + attn(norm(x)); x + ffn(norm(x))   (ffn = MLP or MoE)
                     -> norm -> lm_head -> logits [B, S, V]

Shape legend: B batch, S new tokens, P cached tokens, D hidden, V vocab, L layers.
Names match Hugging Face's Llama/Qwen/Mixtral/OLMoE (without the ``model.`` prefix): ``embed_tokens``,
``layers.N.self_attn.{q,k,v,o}_proj``, ``layers.N.input_layernorm``, ``layers.N.mlp``, ``norm``, ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ConfigError, ShapeError
from moekit.models import decode_step
from moekit.models.config import AttentionType, LMConfig
from moekit.nn.attention import Attention, KVCache, QKNorm
from moekit.nn.attention import attention_mask as build_attention_mask
from moekit.nn.block import Block
from moekit.nn.config import MoEConfig
from moekit.nn.experts import Experts
from moekit.nn.gemv import linear
from moekit.nn.mla import MultiHeadLatentAttention
from moekit.nn.mlp import MLP
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import RotaryEmbedding
from moekit.nn.router import Router
from moekit.nn.routing import MoEAux

IGNORE_INDEX = -100


@dataclasses.dataclass
class LMOutput:
    """What :meth:`MoELM.forward` returns."""

    logits: torch.Tensor  # [B, S, V] (or [B, logits_to_keep, V]) in the model's dtype
    # Mean next-token cross-entropy over labels != -100 (fp32), None without labels. The MoE balancing loss is
    # *not* included: add aux_loss.
    loss: torch.Tensor | None
    aux_loss: torch.Tensor  # sum of the MoE layers' aux.loss (fp32 scalar; 0 for a dense model)
    moe_aux: list[MoEAux]  # one per MoE layer, in layer order
    cache: KVCache | None = None  # the KVCache passed in, now extended by the S new positions


class MoELM(nn.Module):
    """A decoder-only transformer whose FFNs are MoE layers (``config.moe``) or dense MLPs (the dense baseline:
    ``config.moe=None``)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        # On the meta device (built to be given loaded tensors) no init runs: Embedding's own would import ~1 s
        # of torch's reference ops for nothing.
        meta = torch.empty(0).is_meta
        given = torch.empty(c.vocab_size, c.hidden_size) if meta else None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=given)
        self.embed_dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.rotary_emb = RotaryEmbedding(c.rope_dim, c.rope_theta)
        self.layers = nn.ModuleList([self._build_block(i) for i in range(c.num_hidden_layers)])
        moes = [c.moe_config(i) for i in c.sparse_layers]
        self._gating_residual = any(m is not None and m.gating_residual for m in moes)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def _build_block(self, i: int) -> Block:
        c = self.config
        attn: nn.Module
        if c.attention_type == AttentionType.MLA:
            mla_dims = (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim)
            assert all(d is not None for d in mla_dims), "LMConfig validates MLA's sizes"
            attn = MultiHeadLatentAttention(
                c.hidden_size,
                c.num_attention_heads,
                *typing.cast(tuple[int, int, int, int], mla_dims),
                q_lora_rank=c.q_lora_rank,
                attention_bias=c.attention_bias,
                rope_interleave=c.rope_interleave,
                layer_idx=i,
            )
        else:
            attn = Attention(
                c.hidden_size,
                c.num_attention_heads,
                c.kv_heads,
                c.head_size,
                qk_norm=QKNorm(c.qk_norm),
                attention_bias=c.attention_bias,
                rms_norm_eps=c.rms_norm_eps,
                layer_idx=i,
                output_bias=c.attention_out_bias,
            )
        moe = c.moe_config(i)
        if moe and moe.gating_residual:
            moe = self._gating_residual_config(i, moe)
        ffn = MoE(moe, hidden_size=c.hidden_size) if moe else MLP(c.hidden_size, c.intermediate_size, c.activation)
        return Block(attn, ffn, c.hidden_size, c.rms_norm_eps, c.dropout)

    def _gating_residual_config(self, i: int, moe: MoEConfig) -> MoEConfig:
        """MoE++'s gating residual reads the previous MoE layer's logits: the first MoE layer has none, the others
        need a predecessor scoring as many candidates."""
        earlier = [j for j in self.config.sparse_layers if j < i]
        if not earlier:
            return moe.replace(gating_residual=False)
        prev = self.config.moe_config(earlier[-1])
        if prev is None or prev.num_candidates != moe.num_candidates:
            raise ConfigError(
                f"gating_residual: MoE layer {i} scores {moe.num_candidates} candidates but the MoE layer before it "
                f"({earlier[-1]}) scores {0 if prev is None else prev.num_candidates}; give them the same experts"
            )
        return moe

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """:func:`init_weights`, residual std / sqrt(2L) with ``scaled_residual_init`` (GPT-2, Radford et al. 2019)."""
        if self.lm_head.weight.is_meta:  # built to be given loaded tensors: nothing to initialise
            return
        c = self.config
        std = c.initializer_range
        init_weights(self, std, std / math.sqrt(2 * c.num_hidden_layers) if c.scaled_residual_init else std)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        record_routing: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Run the model on S new tokens ``input_ids`` [B, S] after the P tokens already in ``cache`` (if any).

        ``attention_mask`` (1 = real token, 0 = padding: pad with any valid id) covers the new tokens [B, S] or,
        HF style, the cached ones too [B, P + S]. Left padding is the usual layout; positions count real tokens
        only, so a padded row gets the positions of the unpadded one (``position_ids`` [B, S] or [S] override
        them). ``labels`` [B, S], normally the input ids, are shifted inside (position t predicts labels[t + 1]);
        -100 and padding are ignored. ``logits_to_keep`` > 0 computes only the last that many positions' logits.
        """
        one_token = cache is not None and isinstance(input_ids, torch.Tensor) and input_ids.shape == (1, 1)
        if one_token and labels is None and attention_mask is None and position_ids is None and not record_routing:
            self._check_input_ids(input_ids)  # (checked again in _run if the native step declines: one id)
            stepped = decode_step.forward(self, input_ids, cache, logits_to_keep)  # one token, one row: native
            if stepped is not None:
                return stepped
        x, moe_aux, new_valid_BS = self._run(input_ids, attention_mask, cache, record_routing, position_ids)
        if logits_to_keep > 0:
            if labels is not None:
                raise ShapeError("labels need the logits of every position; do not set logits_to_keep with labels")
            x = x[:, -logits_to_keep:]
        logits = linear(self.lm_head, x)  # [B, S, V]

        loss = None if labels is None else self._lm_loss(logits, labels, new_valid_BS)
        aux_loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        for aux in moe_aux:
            aux_loss = aux_loss + aux.loss.to(aux_loss.device, torch.float32)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, moe_aux=moe_aux, cache=cache)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, record_routing: bool = False
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """The final-norm hidden states [B, S, D] (what the LM head reads) and the MoE layers' aux, no cache.

        A classification head (:class:`moekit.models.lm_classifier.LMClassifier`) pools these.
        """
        x, moe_aux, _ = self._run(input_ids, attention_mask, None, record_routing, None)
        return x, moe_aux

    def _run(self, input_ids, attention_mask, cache, record_routing, position_ids):
        """Embedding, blocks and final norm: (hidden [B, S, D], moe_aux, new-token validity [B, S] or None)."""
        c = self.config
        B, S = self._check_input_ids(input_ids)
        P = cache.length if cache is not None else 0
        if P + S > c.max_position_embeddings:
            raise ShapeError(
                f"sequence of {P + S} tokens ({P} cached + {S} new) exceeds max_position_embeddings="
                f"{c.max_position_embeddings}"
            )
        key_valid_BK = self._padding_mask(attention_mask, cache, B, P, S, input_ids.device)  # [B, P+S] | None
        new_valid_BS = None if key_valid_BK is None else key_valid_BK[:, P:]
        position_ids_BS = self._positions(position_ids, key_valid_BK, B, P, S, input_ids.device)
        attn_mask, is_causal = build_attention_mask(key_valid_BK, P, S, input_ids.device, c.sliding_window)

        x = self.embed_dropout(self.embed_tokens(input_ids))  # [B, S, D]
        cos, sin = self.rotary_emb(position_ids_BS, x.dtype)  # [B, S, hd] each
        moe_aux: list[MoEAux] = []
        gate_logits = None  # the last MoE layer's router logits, for the next one's gating residual (MoE++)
        for block in self.layers:
            x, aux = block(
                x, cos, sin, attn_mask, is_causal, cache, new_valid_BS, input_ids, record_routing, gate_logits
            )
            if aux is not None:
                moe_aux.append(aux)
                gate_logits = aux.gate_logits if self._gating_residual else None
        if cache is not None:
            cache.advance(S, key_valid_BK)
        return self.norm(x), moe_aux, new_valid_BS

    def _check_input_ids(self, input_ids: torch.Tensor) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor):
            raise ShapeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            hint = " (add a batch dimension: input_ids[None])" if input_ids.dim() == 1 else ""
            raise ShapeError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}{hint}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ShapeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        B, S = input_ids.shape
        if B == 0 or S == 0:
            raise ShapeError(f"input_ids is empty: shape {(B, S)}")
        lo, hi = (int(v) for v in input_ids.aminmax())
        V = self.config.vocab_size
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ShapeError(
                f"input_ids contain token id {bad} (min {lo}, max {hi}) outside the vocabulary: "
                f"vocab_size={V} allows ids 0..{V - 1}"
            )
        return B, S

    @staticmethod
    def _padding_mask(attention_mask, cache, B, P, S, device) -> torch.Tensor | None:
        """[B, P + S] bool mask of real tokens over cached and new positions; None when nothing is padding."""
        past_BP = cache.mask if cache is not None else None
        if attention_mask is None:
            if past_BP is None:
                return None
            return torch.cat([past_BP, past_BP.new_ones(B, S)], dim=1)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ShapeError(f"attention_mask must be [batch={B}, seq], got {shape}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if mask.shape[1] == P + S:
            full_BK = mask
        elif mask.shape[1] == S:
            past_BP = past_BP if past_BP is not None else mask.new_ones(B, P)
            full_BK = torch.cat([past_BP, mask], dim=1)
        else:
            raise ShapeError(
                f"attention_mask has {mask.shape[1]} positions; expected {S} (new tokens) or {P + S} (cached + new)"
            )
        return None if bool(full_BK.all()) else full_BK

    @staticmethod
    def _positions(position_ids, key_valid_BK, B, P, S, device) -> torch.Tensor:
        if position_ids is not None:
            position_ids = position_ids.to(device)
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if position_ids.shape[-1] != S or position_ids.shape[0] not in (1, B):
                raise ShapeError(f"position_ids must be [{B}, {S}] or [{S}], got {tuple(position_ids.shape)}")
            return position_ids.expand(B, S)
        if key_valid_BK is None:
            return torch.arange(P, P + S, device=device).expand(B, S)
        # Position = number of real tokens before this one, so left padding does not shift RoPE.
        return (key_valid_BK.long().cumsum(-1) - 1).clamp(min=0)[:, P:]

    @staticmethod
    def _lm_loss(logits_BSV, labels_BS, valid_BS) -> torch.Tensor:
        if labels_BS.shape != logits_BSV.shape[:2]:
            raise ShapeError(
                f"labels must have input_ids' shape {tuple(logits_BSV.shape[:2])}, got {tuple(labels_BS.shape)}"
            )
        labels_BS = labels_BS.to(logits_BSV.device).long()
        if valid_BS is not None:
            labels_BS = labels_BS.masked_fill(~valid_BS, IGNORE_INDEX)
        targets = labels_BS[:, 1:].reshape(-1)  # position t predicts token t+1
        logits = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float()  # CE in fp32
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        # Sum / count (not reduction="mean") so a batch with no target gives 0, not NaN.
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    # -- MoE helpers -------------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE) for every sparse layer, in order."""
        return [(i, block.mlp) for i, block in enumerate(self.layers) if isinstance(block.mlp, MoE)]

    @torch.no_grad()
    def update_router_biases(self, loads: Sequence[torch.Tensor] | Mapping[int, torch.Tensor] | None = None) -> None:
        """One aux-loss-free balancing step on every MoE layer (no-op for non-sigmoid routers), from ``loads`` [E]:
        one per MoE layer in order, or a dict layer index -> load (a layer missing from it, or every layer with
        None, uses the load its router accumulated in training, all-reduced first by the caller when distributed)."""
        layers = self.moe_layers()
        if isinstance(loads, Mapping):
            unknown = sorted(set(loads) - {i for i, _ in layers})
            if unknown:
                raise ShapeError(f"loads given for layers {unknown}, which are not MoE layers {[i for i, _ in layers]}")
            for i, moe in layers:
                moe.update_bias(loads.get(i))
            return
        if loads is not None and len(loads) != len(layers):
            raise ShapeError(f"got {len(loads)} loads for {len(layers)} MoE layers")
        for n, (_, moe) in enumerate(layers):
            moe.update_bias(None if loads is None else loads[n])

    def num_parameters(self) -> dict[str, int]:
        """{'total': every parameter (a tied embedding once), 'active': those one token uses}.

        Active counts, per MoE layer, only the ``experts_per_token`` routed experts' weights (plus the
        router and shared experts); everything outside the routed experts is active.
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(
            moe.experts.inactive_parameters(min(moe.config.experts_per_token, moe.config.num_experts))
            for _, moe in self.moe_layers()
        )
        return {"total": total, "active": total - inactive}

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KVCache for this model (preallocated to ``max_length`` positions when given)."""
        return KVCache(self.config.num_hidden_layers, max_length)


@torch.no_grad()
def init_weights(model: nn.Module, std: float, residual_std: float) -> None:
    """N(0, std) for every weight matrix, N(0, residual_std) for those writing into the residual stream
    (o_proj, down projections, experts' w_out), zero biases, unit norms."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_residual = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            nn.init.normal_(module.w_in, mean=0.0, std=std)
            nn.init.normal_(module.w_out, mean=0.0, std=residual_std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
