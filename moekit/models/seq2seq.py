"""An encoder-decoder transformer whose FFNs are dense or MoE, for translation (Vaswani et al. 2017).

    source ids [B, M] -> embed_tokens -> encoder[0..Le): x + attn(norm(x)) (bidirectional, key-padding mask)
                                                        x + ffn(norm(x))
                      -> encoder_norm -> memory [B, M, D]
    target ids [B, S] -> embed_tokens -> decoder[0..Ld): x + self_attn(norm(x))   (causal, RoPE, KV cache)
                                                        x + cross_attn(norm(x), memory)
                                                        x + ffn(norm(x))
                      -> decoder_norm -> embed_tokens.weight^T -> logits [B, S, V]

    ffn: a dense MLP, or an MoE layer every ``moe_every``-th layer of each stack (counted so that the
    last layer is sparse, as in V-MoE; sparse FFNs in an encoder-decoder: GShard, Lepikhin et al. 2021,
    Switch Transformer, Fedus et al. 2022).

One embedding matrix serves the source, the target and the output layer (a joint subword vocabulary;
three-way tying, Press & Wolf 2017). Cross-attention has no positions: the queries look up source content,
whose order the encoder has already mixed in. Decoding: :meth:`Seq2SeqTransformer.start` once per batch of
sources, then :meth:`Seq2SeqTransformer.step` per new token.

Shape legend: B batch, M source tokens, S target tokens (the new ones when decoding), P cached target
tokens, D hidden, H heads, hd head dim, V vocabulary, N selected positions.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import Config, check_choice, require
from moekit.errors import ShapeError
from moekit.models.decoder import CrossAttention, DecoderBlock, DecoderState
from moekit.models.encoder import FFNKind
from moekit.models.lm import init_weights
from moekit.models.placement import is_moe_layer
from moekit.models.resolve import complete_task_dict, equal_active_moe
from moekit.nn.attention import Attention, KVCache, attention_mask
from moekit.nn.block import Block
from moekit.nn.config import MoEConfig, RouterType
from moekit.nn.mlp import MLP
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm
from moekit.nn.rope import RotaryEmbedding
from moekit.nn.routing import MoEAux


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig(Config):
    """An encoder-decoder. The dense baseline with equal active parameters is the same config with
    ``ffn="dense"``: a dense layer's MLP is ``intermediate_size`` wide, and an MoE token runs ``top_k``
    experts of ``intermediate_size // top_k`` each.

    Routers that look at other tokens to route one (expert choice) or mix tokens (Soft MoE) would let a
    target position see later ones, so the decoder takes token-choice routers (softmax/sigmoid top-k),
    hash routing or dense gating only.
    """

    vocab_size: int
    hidden_size: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    ffn: FFNKind = FFNKind.MOE
    moe_every: int = 2
    moe: MoEConfig | None = None  # None: TASK_MOE_DEFAULTS; a partial one is completed (equal_active_moe)
    dropout: float = 0.1
    max_length: int = 128  # longest source the model is given (longer ones are cut) and default decode limit
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "ffn", check_choice("ffn", self.ffn, FFNKind))
        object.__setattr__(self, "moe", equal_active_moe(self.moe, self.intermediate_size))
        sizes = ("vocab_size", "hidden_size", "encoder_layers", "decoder_layers", "num_attention_heads")
        for name in (*sizes, "intermediate_size", "moe_every", "max_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of the heads")
        require((self.hidden_size // self.num_attention_heads) % 2 == 0, "head size must be even (rotary)")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            require(0 <= value < self.vocab_size, f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        require(
            self.ffn != FFNKind.SOFT,
            "ffn='soft' (Soft MoE) mixes all positions of a sequence, so a target token would see later ones; "
            "use ffn='moe' or 'dense'",
        )
        require(
            self.moe is None or not self.moe.gating_residual,
            "gating_residual (MoE++) chains router logits from one MoE layer to the next, which only the language "
            "model (MoELM) wires; set gating_residual=false here",
        )
        require(
            self.moe is None or self.moe.router != RouterType.EXPERT_CHOICE,
            "router='expert_choice' lets experts pick tokens by comparing them across positions, so a target "
            "token's routing would depend on later ones; use a token-choice router (softmax_topk, sigmoid_topk)",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Seq2SeqConfig:
        """As :meth:`Config.from_dict`; a partial ``moe`` is completed, and old runs' flat MoE fields are read."""
        return super().from_dict(complete_task_dict(data, cls.intermediate_size))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass
class Encoded:
    """The encoder's output: memory [B, M, D], its padding mask [B, M] (True = real; None = all real), MoE aux."""

    memory: torch.Tensor
    mask: torch.Tensor | None
    moe_aux: list[MoEAux]


@dataclasses.dataclass
class Seq2SeqOutput:
    """logits: [B, S, V], or [N, V] for the positions picked by ``logits_mask``; aux_loss: the MoE layers'
    summed balancing losses (fp32); moe_aux: one per MoE layer, encoder first."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_aux: list[MoEAux]


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder transformer with dense or MoE FFNs (see the module docstring)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        hd = c.head_dim
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary_emb = RotaryEmbedding(hd)
        self.encoder = nn.ModuleList(
            [
                Block(
                    Attention(c.hidden_size, c.num_attention_heads, c.num_attention_heads, hd, layer_idx=i),
                    self._ffn(
                        c.ffn == FFNKind.MOE and is_moe_layer(i, c.encoder_layers, every=c.moe_every, last_sparse=True)
                    ),
                    c.hidden_size,
                    c.rms_norm_eps,
                )
                for i in range(c.encoder_layers)
            ]
        )
        self.encoder_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(
                    Attention(c.hidden_size, c.num_attention_heads, c.num_attention_heads, hd, layer_idx=i),
                    CrossAttention(c.hidden_size, c.num_attention_heads, hd),
                    self._ffn(
                        c.ffn == FFNKind.MOE and is_moe_layer(i, c.decoder_layers, every=c.moe_every, last_sparse=True)
                    ),
                    c.hidden_size,
                    c.rms_norm_eps,
                )
                for i in range(c.decoder_layers)
            ]
        )
        self.decoder_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.reset_parameters()

    def _ffn(self, sparse: bool) -> nn.Module:
        c = self.config
        return MoE(c.moe, hidden_size=c.hidden_size) if sparse else MLP(c.hidden_size, c.intermediate_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """:func:`~moekit.models.lm.init_weights`, residual std / sqrt(2L) with L all layers (as GPT-2)."""
        std, layers = self.config.initializer_range, self.config.encoder_layers + self.config.decoder_layers
        init_weights(self, std, std / math.sqrt(2 * layers))

    # -- sizes ---------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one token passes through: all but the experts a token does not run."""
        return self.num_parameters() - sum(
            moe.experts.inactive_parameters(moe.config.experts_per_token) for moe in self.moe_layers()
        )

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in [*self.encoder, *self.decoder] if isinstance(b.mlp, MoE)]

    # -- encoder -------------------------------------------------------------------------------------
    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, record_routing: bool = False):
        """Source ids [B, M] (long) and mask [B, M] (True = real token) -> :class:`Encoded`."""
        if src_ids.dim() != 2 or src_ids.dtype != torch.long:
            raise ShapeError(f"source ids must be [batch, seq] (long), got {tuple(src_ids.shape)} {src_ids.dtype}")
        if src_mask is not None and tuple(src_mask.shape) != tuple(src_ids.shape):
            raise ShapeError(f"source mask has shape {tuple(src_mask.shape)}, ids {tuple(src_ids.shape)}")
        B, M = src_ids.shape
        x = self.dropout(self.embed_tokens(src_ids))  # [B, M, D]
        valid = None if src_mask is None or bool(src_mask.all()) else src_mask.bool()
        attn_mask = None if valid is None else valid[:, None, None, :]  # every query sees the real keys
        cos, sin = self.rotary_emb(torch.arange(M, device=x.device).expand(B, M), x.dtype)
        moe_aux: list[MoEAux] = []
        for block in self.encoder:
            x, aux = block(x, cos, sin, attn_mask, False, None, valid, src_ids, record_routing)
            if aux is not None:
                moe_aux.append(aux)
        return Encoded(self.encoder_norm(x), valid, moe_aux)

    # -- decoder -------------------------------------------------------------------------------------
    def start(self, encoded: Encoded, expand: int = 1, max_length: int | None = None) -> DecoderState:
        """The state for incremental decoding of ``encoded``'s B sources, each repeated ``expand`` times (beams) next
        to each other; ``max_length`` preallocates the self-attention cache for that many positions (None: grow)."""
        kv, mask = self._memory_kv(encoded)
        if expand > 1:
            kv = [(k.repeat_interleave(expand, 0), v.repeat_interleave(expand, 0)) for k, v in kv]
            mask = None if mask is None else mask.repeat_interleave(expand, 0)
        return DecoderState(KVCache(len(self.decoder), max_length), kv, mask)

    def _memory_kv(self, encoded: Encoded) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """Each decoder layer's cross-attention keys/values of the memory, and its mask as SDPA wants it."""
        blocks = typing.cast(list[DecoderBlock], list(self.decoder))
        kv = [block.cross_attn.project_memory(encoded.memory) for block in blocks]
        return kv, None if encoded.mask is None else encoded.mask[:, None, None, :]

    def decode(
        self,
        tgt_ids: torch.Tensor,
        encoded: Encoded | None = None,
        state: DecoderState | None = None,
        tgt_mask: torch.Tensor | None = None,
        record_routing: bool = False,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Decoder hidden states [B, S, D] (after the final norm) of S target tokens.

        Either ``encoded`` (whole target sequences at once, causal; training and the uncached reference) or
        ``state`` (S new tokens after the ``state.cache.length`` already decoded; the state is advanced).
        ``tgt_mask`` [B, S] marks real tokens (right padding: pads come last, so causality alone keeps
        real tokens from seeing them); padding is not routed by the MoE layers.
        """
        if (encoded is None) == (state is None):
            raise ShapeError("decode() takes exactly one of encoded (full sequences) and state (incremental)")
        if tgt_ids.dim() != 2 or tgt_ids.dtype != torch.long:
            raise ShapeError(f"target ids must be [batch, seq] (long), got {tuple(tgt_ids.shape)} {tgt_ids.dtype}")
        B, S = tgt_ids.shape
        if state is None:
            assert encoded is not None  # one of the two, checked above
            memory_kv, memory_mask = self._memory_kv(encoded)
            cache, P = None, 0
        else:
            memory_kv, memory_mask, cache, P = state.memory_kv, state.memory_mask, state.cache, state.cache.length
        if memory_kv[0][0].shape[0] != B:
            raise ShapeError(f"{B} target rows but the memory holds {memory_kv[0][0].shape[0]}")
        x = self.dropout(self.embed_tokens(tgt_ids))  # [B, S, D]
        self_mask, is_causal = attention_mask(None, P, S, x.device)
        cos, sin = self.rotary_emb(torch.arange(P, P + S, device=x.device).expand(B, S), x.dtype)
        pad = None if tgt_mask is None or bool(tgt_mask.all()) else tgt_mask.bool()
        moe_aux: list[MoEAux] = []
        for block, kv in zip(self.decoder, memory_kv):
            x, aux = block(x, cos, sin, self_mask, is_causal, cache, kv, memory_mask, pad, tgt_ids, record_routing)
            if aux is not None:
                moe_aux.append(aux)
        if cache is not None:
            cache.advance(S)
        return self.dropout(self.decoder_norm(x)), moe_aux

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] -> scores over the vocabulary [..., V] (the tied embedding as output layer)."""
        return F.linear(hidden, self.embed_tokens.weight)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Logits [B, V] of the next token after feeding ``tokens`` [B, S] (usually S = 1) to ``state``."""
        hidden, _ = self.decode(tokens, state=state)
        return self.logits(hidden[:, -1])

    def forward(
        self,
        src_ids: torch.Tensor,
        tgt_ids: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
        record_routing: bool = False,
    ) -> Seq2SeqOutput:
        """Teacher-forced scores of sources [B, M] for decoder inputs ``tgt_ids`` [B, S] (BOS + target, right-padded;
        position t predicts target token t); masks are True for real tokens. With ``logits_mask`` [B, S], only
        those positions' logits are computed ([N, V]), which spares the output layer the padding."""
        encoded = self.encode(src_ids, src_mask, record_routing)
        hidden, dec_aux = self.decode(tgt_ids, encoded, tgt_mask=tgt_mask, record_routing=record_routing)
        if logits_mask is not None:
            hidden = hidden[logits_mask]  # [N, D]
        logits = self.logits(hidden)
        moe_aux = encoded.moe_aux + dec_aux
        aux_loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        for aux in moe_aux:
            aux_loss = aux_loss + aux.loss.to(aux_loss.device, torch.float32)
        return Seq2SeqOutput(logits=logits, aux_loss=aux_loss, moe_aux=moe_aux)
