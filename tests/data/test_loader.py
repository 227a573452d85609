"""Token batches: nanoGPT split, seeded random windows, exact resume, deterministic eval windows."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.data.loader import TokenDataset, TokenLoader, iter_eval_batches, split_tokens
from moekit.errors import ConfigError, DataError

TOKENS = torch.arange(1000) % 97


def test_split_is_first_90_last_10_and_deterministic():
    train, val = split_tokens(list(range(100)))
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    a, b = split_tokens(TOKENS, 0.25)
    assert torch.equal(torch.cat([a, b]), TOKENS) and len(b) == 250
    assert all(torch.equal(x, y) for x, y in zip(split_tokens(TOKENS), split_tokens(TOKENS)))
    with pytest.raises(ConfigError, match="val_fraction"):
        split_tokens(TOKENS, 1.0)


def test_batches_are_shifted_windows():
    loader = TokenLoader(torch.arange(500), block_size=16, batch_size=4, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # arange corpus: the target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows


def test_seeded_and_seed_sensitive():
    a = [next(TokenLoader(TOKENS, 8, 4, seed=1))[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = TokenLoader(TOKENS, 8, 4, seed=2)
    assert not torch.equal(a[0], next(b)[0])


def test_resume_gives_identical_batches():
    full = TokenLoader(TOKENS, block_size=8, batch_size=4, seed=3)
    expected = [next(full) for _ in range(10)]
    first = TokenLoader(TOKENS, block_size=8, batch_size=4, seed=3)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenLoader(TOKENS, block_size=8, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    for want in expected[6:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_refuses_other_corpus():
    state = TokenLoader(TOKENS, 8, 4).state_dict()
    other = TokenLoader(TOKENS[:500], 8, 4)
    with pytest.raises(DataError, match="num_tokens=1000 but this loader has num_tokens=500"):
        other.load_state_dict(state)


def test_short_corpus_error():
    with pytest.raises(DataError, match="has 10 tokens; block_size=16 needs at least 17"):
        TokenLoader(torch.arange(10), block_size=16, batch_size=2)
    TokenLoader(torch.arange(17), block_size=16, batch_size=2)  # exactly enough
    with pytest.raises(DataError, match="1-D"):
        TokenLoader(torch.zeros(2, 40, dtype=torch.long), 8, 2)


def test_eval_batches_non_overlapping_and_deterministic():
    toks = torch.arange(50)
    batches = list(iter_eval_batches(toks, block_size=8, batch_size=2))
    xs = torch.cat([x for x, _ in batches])
    assert xs[:, 0].tolist() == [0, 8, 16, 24, 32, 40]  # 6 windows; the 7th would need token 56
    assert [len(x) for x, _ in batches] == [2, 2, 2]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(iter_eval_batches(toks, 8, 2, max_batches=2))) == 2
    again = list(iter_eval_batches(toks, 8, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(TokenDataset(torch.arange(17), 16)) == 1
