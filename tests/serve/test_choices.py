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

    async def read(lag_s: float, routed: bool = False):
        pieces = []
        params = [SamplingParams(max_tokens=24, temperature=0, return_routed_experts=routed)]
        async for piece in run_choices(engine, tokenizer, prompt, params, []):
            pieces.append(piece)
            await asyncio.sleep(lag_s)  # meanwhile the engine decodes on: its tokens queue up
        return pieces

    try:
        pieces = asyncio.run(read(0.5))
        routed = asyncio.run(read(0.2, routed=True))
        routed_at_pace = asyncio.run(read(0, routed=True))
    finally:
        engine.stop()
    tokens = [t.token_id for p in pieces for t in p.tokens]
    assert tokens == expected and "".join(p.text for p in pieces) == tokenizer.decode(expected)
    assert len(pieces) < len(expected) and max(len(p.tokens) for p in pieces) > 1
    assert pieces[-1].finish_reason == "length" and all(p.finish_reason is None for p in pieces[:-1])
    # with routed experts a piece is a token's text (a character's bytes) as at pace: the chat page colours each
    assert [len(p.tokens) for p in routed] == [len(p.tokens) for p in routed_at_pace]
    assert len(routed) > len(pieces) and all(len(t.experts) == 2 for p in routed for t in p.tokens)
