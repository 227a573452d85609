"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p,
repetition penalty), batched prompts left-padded, and streaming variants for batch 1 (token ids or text).

Cached decoding reproduces uncached decoding token for token for token-choice routers without a
capacity limit (tested). Expert-choice routing (non-causal: a token's experts depend on the other
tokens) and capacity limits (which depend on the number of tokens in the call) make decoding depend
on the batch, as in any MoE implementation.

Shape legend: B prompts, L longest prompt, V vocab.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Sequence
from typing import Any, Literal, overload

import torch

from moekit.config import Config, check_choice, require
from moekit.data.tokenizers import Tokenizer
from moekit.errors import ShapeError
from moekit.nn.replay import RouterReplay


class ContextOverflow(str, enum.Enum):
    """What happens when prompt + new tokens would exceed the model's ``max_position_embeddings``."""

    SLIDE = "slide"  # when the context is full, keep its last 3/4, re-encode them, and continue
    ERROR = "error"  # refuse before generating (names the largest max_new_tokens that fits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig(Config):
    """How :func:`generate` picks each next token.

    Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a draw.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    top_p: float | None = None  # nucleus sampling (Holtzman et al. 2020); None or 1.0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): seen tokens' logits / p if > 0, * p if < 0
    stop_token_ids: tuple[int, ...] = ()  # stop a row at any of these (the stop token is not returned)
    seed: int | None = None  # seeds a private torch.Generator: same seed, same samples
    pad_token_id: int = 0  # fills the left padding of shorter prompts (never attended to)
    # Ids >= this are never picked: a model's vocabulary is often padded past its tokenizer's.
    vocab_limit: int | None = None
    # A prompt longer than the context is always an error; this decides what happens once the
    # prompt plus the new tokens outgrow it.
    context_overflow: ContextOverflow = ContextOverflow.SLIDE

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
            f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}",
        )
        require(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k == 0:
            set_(self, "top_k", None)
        require(
            self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
            f"top_k must be a positive integer or None, got {self.top_k!r}",
        )
        require(
            self.top_p is None or 0 < self.top_p <= 1,
            f"top_p must be in (0, 1] or None, got {self.top_p!r}",
        )
        require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        stops = self.stop_token_ids
        if isinstance(stops, int):
            stops = (stops,)
        require(
            isinstance(stops, (list, tuple)) and all(isinstance(t, int) and t >= 0 for t in stops),
            f"stop_token_ids must be a tuple of token ids >= 0, got {self.stop_token_ids!r}",
        )
        set_(self, "stop_token_ids", tuple(stops))
        require(
            isinstance(self.pad_token_id, int) and self.pad_token_id >= 0,
            f"pad_token_id must be an integer >= 0, got {self.pad_token_id!r}",
        )
        require(
            self.vocab_limit is None or (isinstance(self.vocab_limit, int) and self.vocab_limit >= 1),
            f"vocab_limit must be a positive integer or None, got {self.vocab_limit!r}",
        )
        set_(self, "context_overflow", check_choice("context_overflow", self.context_overflow, ContextOverflow))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@overload
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    return_routed_experts: Literal[False] = False,
    **overrides: Any,
) -> list[list[int]]: ...


@overload
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    return_routed_experts: Literal[True],
    **overrides: Any,
) -> tuple[list[list[int]], list[torch.Tensor]]: ...


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    return_routed_experts: bool = False,
    **overrides: Any,
) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
    """Continue each prompt; returns the new token ids of each, without the stop token (stopped rows are shorter).

    ``model`` is a :class:`moekit.models.MoELM` (or any module with its forward, ``new_cache`` and ``config``);
    ``prompts`` are token-id lists of any lengths (left-padded here) or a [B, L] tensor without padding;
    ``overrides`` are GenerationConfig fields replacing ``config``'s (``max_new_tokens=20, temperature=0``).
    With ``return_routed_experts`` it returns ``(tokens, routed)``: per row the experts each MoE layer chose for
    every prompt and new token, [tokens, layers, top_k] (the layout of :class:`moekit.nn.replay.RouterReplay`,
    which replays it in a training forward over prompt + new tokens).
    """
    config = _resolve_config(config, overrides)
    rows = _as_rows(prompts)
    out: list[list[int]] = [[] for _ in rows]
    if not return_routed_experts:
        for step_tokens in _decode(model, rows, config):
            for row, token in enumerate(step_tokens):
                if token is not None:
                    out[row].append(token)
        return out
    lm_config: Any = model.config
    context = lm_config.max_position_embeddings
    _check_prompts(rows, config, lm_config.vocab_size, context)
    longest = max(len(r) for r in rows)
    if config.max_new_tokens == 0:
        raise ShapeError("return_routed_experts needs max_new_tokens >= 1 (with 0 the model never runs)")
    if longest + config.max_new_tokens > context:
        raise ShapeError(
            f"return_routed_experts needs prompt + max_new_tokens ({longest} + {config.max_new_tokens}) within the "
            f"model's context of {context} tokens (a sliding window re-encodes, and would record tokens twice)"
        )
    with RouterReplay(model) as recorder:
        for step_tokens in _decode(model, rows, config, feed_last=True):
            for row, token in enumerate(step_tokens):
                if token is not None:
                    out[row].append(token)
    routed_BSLW = recorder.experts()
    return out, [routed_BSLW[i, longest - len(r) : longest + len(out[i])] for i, r in enumerate(rows)]


def stream_generate(
    model: torch.nn.Module,
    prompt: Sequence[int] | torch.Tensor,
    config: GenerationConfig | None = None,
    **overrides: Any,
) -> Iterator[int]:
    """Yield the new token ids of one ``prompt`` (a list of ids, a 1-D or a [1, L] tensor) as they are produced, for
    streaming text to a terminal; the stop token is not yielded. Arguments (as :func:`generate`'s) are checked
    at the call, not at the first ``next``."""
    config = _resolve_config(config, overrides)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise ShapeError(f"stream_generate takes one prompt; got a tensor of shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and any(isinstance(t, (Sequence, torch.Tensor)) for t in prompt):
        raise ShapeError("stream_generate takes one prompt (a list of token ids); use generate() for a batch")
    rows = _as_rows([prompt])
    _check_prompts(rows, config, model.config.vocab_size, model.config.max_position_embeddings)  # fail now
    return _stream(model, rows, config)


def stream_text(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, stop: Sequence[str] = (), **generation: Any
) -> Iterator[str]:
    """Yield pieces of generated text as tokens arrive; stops at (and excludes) any ``stop`` string.

    ``generation`` holds :class:`GenerationConfig` fields; sampling is limited to the tokenizer's vocabulary.
    """
    config = GenerationConfig(**{"vocab_limit": tokenizer.vocab_size, **generation})
    new: list[int] = []
    shown = ""
    for token in stream_generate(model, tokenizer.encode(prompt), config):
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            continue
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            yield text[len(shown) : cut]
            return
        yield text[len(shown) :]
        shown = text


def _stream(model, rows: list[list[int]], config: GenerationConfig) -> Iterator[int]:
    for step_tokens in _decode(model, rows, config):
        if step_tokens[0] is None:
            return
        yield step_tokens[0]


# -- internals ------------------------------------------------------------------------------------
def _resolve_config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    config = config if config is not None else GenerationConfig()
    return config.replace(**overrides) if overrides else config


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ShapeError(f"prompts tensor must be [batch, seq], got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
        raise ShapeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ShapeError("prompts is empty: give at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, int) or not isinstance(p, (Sequence, torch.Tensor)) or isinstance(p, (str, bytes)):
            raise ShapeError(
                f"prompts[{i}] is {type(p).__name__}, not a list of token ids "
                "(for a single prompt pass [ids], or use stream_generate)"
            )
        rows.append([int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)])
    return rows


def _check_prompts(rows: list[list[int]], config: GenerationConfig, vocab_size: int, context: int) -> None:
    for i, row in enumerate(rows):
        if not row:
            raise ShapeError(f"prompt {i} is empty; start it with at least one token (e.g. a BOS or newline)")
        if len(row) > context:
            raise ShapeError(
                f"prompt {i} has {len(row)} tokens but the model's context (max_position_embeddings) is {context}"
            )
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ShapeError(f"prompt {i} has token id {bad[0]} outside the vocabulary 0..{vocab_size - 1}")
    if not 0 <= config.pad_token_id < vocab_size:
        raise ShapeError(f"pad_token_id={config.pad_token_id} is outside the vocabulary 0..{vocab_size - 1}")
    longest = max(len(r) for r in rows)
    if config.context_overflow == ContextOverflow.ERROR and longest + config.max_new_tokens > context:
        raise ShapeError(
            f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} exceeds the model's context "
            f"of {context} tokens; use max_new_tokens <= {context - longest} or context_overflow='slide'"
        )


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _decode(
    model, rows: list[list[int]], config: GenerationConfig, feed_last: bool = False
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has stopped); ``feed_last``: run the model on the
    last new tokens too (their routing is recorded; the cache has room, being sized for prompt + new tokens)."""
    lm_cfg = model.config
    V, C = lm_cfg.vocab_size, lm_cfg.max_position_embeddings
    _check_prompts(rows, config, V, C)
    if config.max_new_tokens == 0:
        return
    device = _device_of(model)
    B, L = len(rows), max(len(r) for r in rows)
    # Left padding: every row's last prompt token sits in column L-1, so one next-token column serves all.
    ids_BL = torch.full((B, L), config.pad_token_id, dtype=torch.long, device=device)
    mask_BL = torch.zeros((B, L), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        ids_BL[i, L - len(row) :] = torch.tensor(row, dtype=torch.long, device=device)
        mask_BL[i, L - len(row) :] = True
    generator = None
    if config.seed is not None and not config.greedy:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seen_BV = None
    if config.repetition_penalty != 1.0:
        seen_BV = torch.zeros((B, V), dtype=torch.bool, device=device)
        seen_BV.scatter_(1, ids_BL, mask_BL)
    stops = set(config.stop_token_ids)
    finished = [False] * B

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache, logits_BV = _prefill(model, ids_BL, mask_BL, L + config.max_new_tokens, C)
        for step in range(config.max_new_tokens):
            with torch.inference_mode():
                next_B = next_tokens(logits_BV, config, generator, seen_BV)
            tokens = next_B.tolist()
            emitted: list[int | None] = []
            for i, t in enumerate(tokens):
                if finished[i] or t in stops:
                    finished[i] = True
                    emitted.append(None)
                else:
                    emitted.append(t)
            yield emitted
            last = all(finished) or step == config.max_new_tokens - 1
            if last and not (feed_last and not all(finished)):
                return
            with torch.inference_mode():
                alive_B = torch.tensor([not f for f in finished], device=device)
                next_B = torch.where(alive_B, next_B, torch.full_like(next_B, config.pad_token_id))
                if seen_BV is not None:
                    seen_BV[alive_B, next_B[alive_B]] = True
                ids_BL = torch.cat([ids_BL, next_B[:, None]], dim=1)
                mask_BL = torch.cat([mask_BL, mask_BL.new_ones(B, 1)], dim=1)
                if cache.length + 1 > C:  # context_overflow == "slide": re-encode the recent window
                    keep = max(1, (3 * C) // 4)
                    ids_BL, mask_BL = ids_BL[:, -keep:], mask_BL[:, -keep:]
                    remaining = config.max_new_tokens - step - 1
                    cache, logits_BV = _prefill(model, ids_BL, mask_BL, keep + remaining, C)
                else:
                    out = model(next_B[:, None], cache=cache, logits_to_keep=1)
                    logits_BV = out.logits[:, -1]
            if last:
                return
    finally:
        model.train(was_training)


def _prefill(model, ids_BL: torch.Tensor, mask_BL: torch.Tensor, total: int, context: int):
    """Encode the prompt into a fresh cache sized for ``total`` positions; return (cache, last logits [B, V])."""
    cache = model.new_cache(max_length=min(total, context))
    mask = None if bool(mask_BL.all()) else mask_BL
    out = model(ids_BL, attention_mask=mask, cache=cache, logits_to_keep=1)
    return cache, out.logits[:, -1]


def next_tokens(
    logits_BV: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
    seen_BV: torch.Tensor | None,
) -> torch.Tensor:
    """Pick one token per row [B] (fp32 logits; ties in argmax go to the lowest id)."""
    logits = logits_BV.float()
    if config.vocab_limit is not None and config.vocab_limit < logits.shape[-1]:
        logits = logits.clone()  # .float() may return the model's own tensor
        logits[:, config.vocab_limit :] = float("-inf")
    if seen_BV is not None:
        p = config.repetition_penalty
        logits = torch.where(seen_BV, torch.where(logits > 0, logits / p, logits * p), logits)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth_B1 = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_B1, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= config.top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
