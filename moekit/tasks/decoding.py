"""Greedy and beam search for :class:`moekit.models.seq2seq.Seq2SeqTransformer`.

Both decode a batch of sources at once with the incremental decoder (self-attention KV cache, cross-attention
keys/values computed once per source). ``greedy_search(..., use_cache=False)`` re-runs the decoder over the
whole prefix at every step: the slow reference the cached path is tested against.

Beam search follows fairseq's bookkeeping (Ott et al. 2019): each step takes the best 2K continuations of
the K live hypotheses; one ending in EOS is finished only if it ranks among the best K (so beam 1 is greedy),
the best K others live on, and a sentence is done once it has K finished hypotheses. Finished hypotheses
are ranked by log-probability divided by GNMT's length penalty ((5 + |y|) / 6) ** alpha
(Wu et al. 2016, eq. 14; alpha = 0 ranks by plain log-probability).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from moekit.data.bpe import EOS_ID, PAD_ID, SubwordTokenizer
from moekit.errors import ConfigError, DataError
from moekit.models.seq2seq import Seq2SeqTransformer

log = logging.getLogger(__name__)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.inference_mode()
def greedy_search(model, src_ids, src_mask, max_new_tokens: int, use_cache: bool = True) -> list[list[int]]:
    """B lists of target ids (without BOS and EOS): the most likely next token at every step, for each of the
    sources ``src_ids`` [B, M] (``src_mask``: True = real token, or None), until EOS or ``max_new_tokens``. The
    model runs in eval mode; ``use_cache=False`` recomputes the prefix each step (the reference)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    c = model.config
    was_training = model.training
    model.eval()
    try:
        encoded = model.encode(src_ids, src_mask)
        B = src_ids.shape[0]
        tokens = torch.full((B, 1), c.bos_token_id, dtype=torch.long, device=src_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
        state = model.start(encoded, max_length=max_new_tokens + 1) if use_cache else None
        for _ in range(max_new_tokens):
            if state is not None:
                logits = model.step(tokens[:, -1:], state)
            else:
                hidden, _ = model.decode(tokens, encoded)
                logits = model.logits(hidden[:, -1])
            nxt = logits.argmax(-1).masked_fill(done, c.eos_token_id)  # [B]
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == c.eos_token_id
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return [_cut(row[1:], c.eos_token_id) for row in tokens.tolist()]


@torch.inference_mode()
def beam_search(model, src_ids, src_mask, max_new_tokens: int, beam: int = 4, alpha: float = 0.6) -> list[list[int]]:
    """As :func:`greedy_search`, but each source's best of ``beam`` hypotheses under the length-penalised score
    (module docstring; ``alpha`` 0: no penalty, larger favours longer translations)."""
    if beam < 1:
        raise ConfigError(f"beam must be >= 1, got {beam}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    c = model.config
    eos, K = c.eos_token_id, beam
    was_training = model.training
    model.eval()
    try:
        B = src_ids.shape[0]
        device = src_ids.device
        state = model.start(model.encode(src_ids, src_mask), expand=K, max_length=max_new_tokens + 1)
        tokens = torch.full((B * K, 1), c.bos_token_id, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = -torch.inf  # all K rows start identical: only the first may expand at step 0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(max_new_tokens):
            logp = torch.log_softmax(model.step(tokens[:, -1:], state).float(), dim=-1)  # [B*K, V]
            V = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=-1)  # [B, 2K]
            parents, words = (top_idx // V).tolist(), (top_idx % V).tolist()
            top = top_scores.tolist()
            prefix = tokens[:, 1:].tolist()
            new_scores = torch.full((B, K), -torch.inf, device=device)
            new_rows = torch.arange(B * K, device=device).view(B, K).clone()
            new_words = torch.full((B, K), eos, dtype=torch.long, device=device)
            for b in range(B):
                if done[b]:
                    continue
                alive = 0
                for rank, score in enumerate(top[b]):
                    if score == -torch.inf or alive == K:
                        break
                    parent, word = parents[b][rank], words[b][rank]
                    if word == eos:
                        if rank < K:  # only an EOS among the best K ends a hypothesis (beam 1 = greedy)
                            hyp = prefix[b * K + parent]
                            finished[b].append((score / length_penalty(t + 1, alpha), hyp))
                        continue
                    new_scores[b, alive] = score
                    new_rows[b, alive] = b * K + parent
                    new_words[b, alive] = word
                    alive += 1
                if len(finished[b]) >= K:
                    done[b] = True
            if all(done):
                break
            rows = new_rows.view(-1)
            state.reorder(rows)
            tokens = torch.cat([tokens.index_select(0, rows), new_words.view(-1, 1)], dim=1)
            scores = new_scores
        else:  # out of steps: the live hypotheses compete as they are
            prefix = tokens[:, 1:].tolist()
            for b in range(B):
                if not done[b]:
                    for k in range(K):
                        if scores[b, k] > -torch.inf:
                            finished[b].append(
                                (float(scores[b, k]) / length_penalty(max_new_tokens, alpha), prefix[b * K + k])
                            )
    finally:
        model.train(was_training)
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]


# -- translating ---------------------------------------------------------------------------------
def translate(
    model: Seq2SeqTransformer,
    tokenizer: SubwordTokenizer,
    sentences: Sequence[str],
    beam: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    alpha: float = 0.6,
) -> list[str]:
    """Translate sentences (greedy with ``beam=1``, else beam search with length penalty ``alpha``).

    Sources longer than the model's ``max_length`` tokens are cut there; empty sentences translate to "".
    ``max_new_tokens`` (default: twice the source plus 10, at most twice ``max_length``) bounds a translation;
    ``batch_size`` sentences are decoded together, sorted by length so that padding stays small.
    """
    limit = model.config.max_length
    encoded = tokenizer.encode_batch([s.strip() for s in sentences])
    cut = sum(len(enc) >= limit for enc in encoded)
    if cut:
        log.warning("%d of %d sources were cut to the model's max_length=%d tokens", cut, len(encoded), limit)
    ids = [enc[: limit - 1] + [EOS_ID] for enc in encoded]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = [i for i in order[start : start + batch_size] if sentences[i].strip()]
        if not rows:
            continue
        width = max(len(ids[i]) for i in rows)
        src = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for r, i in enumerate(rows):
            src[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        steps = max_new_tokens or min(2 * width + 10, 2 * limit)
        mask = src != PAD_ID
        if beam == 1:
            hyps = greedy_search(model, src, mask, steps)
        else:
            hyps = beam_search(model, src, mask, steps, beam=beam, alpha=alpha)
        for i, hyp in zip(rows, hyps):
            out[i] = tokenizer.decode(hyp)
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization, the WMT default) of detokenized text."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} translations but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
