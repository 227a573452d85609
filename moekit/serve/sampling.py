"""One request's sampling: its parameters, its private random generator, and what is reported per token."""

from __future__ import annotations

import dataclasses

import torch

from moekit.inference.generate import GenerationConfig, next_tokens

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (checked by the HTTP layer; the engine trusts them)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()  # end the answer (not returned)
    logprobs: int | None = None  # None = off; n >= 0 = the chosen token's logprob and the n most likely
    prompt_logprobs: bool = False  # also score the prompt's tokens (completions' echo), with ``logprobs`` top ones
    return_routed_experts: bool = False
    timeout_s: float | None = None


@dataclasses.dataclass
class TokenChoice:
    """One generated token and what the request asked to know about it."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    experts: list[list[int]] | None = None  # [layers][top_k] for the position that chose this token


class Sampler:
    """Picks a request's tokens from its logits rows, with moekit.generate's exact sampling code and order."""

    def __init__(self, params: SamplingParams, vocab_limit: int | None, device: torch.device):
        self.params = params
        self.config = GenerationConfig(
            temperature=params.temperature,
            top_p=params.top_p if params.top_p < 1 else None,
            vocab_limit=vocab_limit,
        )
        self.generator: torch.Generator | None = None
        if not self.config.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def pick(self, logits_1V: torch.Tensor) -> TokenChoice:
        """The next token for this row's logits [1, V] (fp32 maths, as generate's)."""
        token = int(next_tokens(logits_1V, self.config, self.generator, None)[0])
        return self.scored(token, logits_1V[0]) if self.params.logprobs is not None else TokenChoice(token)

    def scored(self, token: int, logits_V: torch.Tensor) -> TokenChoice:
        """``token`` with its logprob (and the ``logprobs`` most likely tokens) under ``logits_V`` [V]."""
        logits = logits_V.float()
        limit = self.config.vocab_limit
        if limit is not None and limit < logits.shape[-1]:
            logits = logits[:limit]
        logp_V = logits.log_softmax(-1)
        choice = TokenChoice(token, logprob=float(logp_V[token]))
        if self.params.logprobs:
            top = logp_V.topk(min(self.params.logprobs, logp_V.shape[-1]))
            choice.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        return choice

    def score_prompt(self, prompt: list[int], logits_PV: torch.Tensor) -> list[TokenChoice]:
        """Every prompt token scored by the logits of the position before it (``logits_PV``: the prompt's
        [len(prompt), V] rows); the first token has no logprob, as in OpenAI's echo."""
        first = TokenChoice(prompt[0])
        return [first] + [self.scored(t, logits_PV[i]) for i, t in enumerate(prompt[1:])]
