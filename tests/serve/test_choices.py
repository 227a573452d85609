"""Running a request's choices from asyncio: a consumer that falls behind gets fewer, larger pieces, same text."""

from __future__ import annotations

import asyncio

from moekit.data.tokenizers import ByteTokenizer
from moekit.inference import generate
from moekit.serve.choices import run_choices
from moekit.serve.engine import Engine
from moekit.serve.sampling import SamplingParams


def test_a_consumer_that_falls_behind_gets_the_queued_tokens_as_one_piece(model):
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode("slow reader")
    expected = generate(model, [prompt], max_new_tokens=24, temperature=0)[0]
    engine = Engine(model, max_batch=4, vocab_limit=tokenizer.vocab_size).start()

    async def read(lag_s: float):
        pieces = []
        async for piece in run_choices(engine, tokenizer, prompt, [SamplingParams(max_tokens=24, temperature=0)], []):
            pieces.append(piece)
            await asyncio.sleep(lag_s)  # meanwhile the engine decodes on: its tokens queue up
        return pieces

    try:
        pieces = asyncio.run(read(0.5))
    finally:
        engine.stop()
    tokens = [t.token_id for p in pieces for t in p.tokens]
    assert tokens == expected and "".join(p.text for p in pieces) == tokenizer.decode(expected)
    assert len(pieces) < len(expected) and max(len(p.tokens) for p in pieces) > 1
    assert pieces[-1].finish_reason == "length" and all(p.finish_reason is None for p in pieces[:-1])
