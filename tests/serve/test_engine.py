"""The continuous-batching engine: batched answers equal lone ones, rows join and leave, sampling, caps."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from moekit.inference import generate
from moekit.nn import MoEConfig
from moekit.serve.engine import Engine, EngineStopped, Finished, PromptScores, QueueFull
from moekit.serve.rows import combine
from moekit.serve.sampling import SamplingParams

from .conftest import VOCAB, tiny_model


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def ids(choices) -> list[int]:
    return [c.token_id for c in choices]


@pytest.fixture
def engine(model):
    engine = Engine(model, max_batch=16, max_queue=64).start()
    yield engine
    engine.stop()


def test_sixteen_concurrent_greedy_requests_equal_sixteen_sequential_ones_and_generate(model, engine):
    batch = prompts(16)
    lengths = [5 + 3 * i for i in range(16)]  # rows leave at different steps
    together = [None] * 16
    threads = []

    def run(i):
        together[i] = ids(engine.generate([batch[i]], SamplingParams(max_tokens=lengths[i], temperature=0))[0])

    for i in range(16):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    alone = [ids(engine.generate([p], SamplingParams(max_tokens=n, temperature=0))[0]) for p, n in zip(batch, lengths)]
    reference = [generate(model, [p], max_new_tokens=n, temperature=0)[0] for p, n in zip(batch, lengths)]
    assert together == alone == reference
    assert [len(t) for t in together] == lengths


VARIANTS = {
    "mla_sigmoid_first_dense": dict(
        attention_type="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        num_hidden_layers=3, first_k_dense=1,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_size=16, router="sigmoid_topk", n_group=2, topk_group=1),
    ),
    "dense": dict(moe=None),
    "qk_norm_one_kv_head": dict(qk_norm="head", num_key_value_heads=1, head_dim=12),
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_answers_equal_lone_ones_across_model_variants(variant):
    model = tiny_model(**VARIANTS[variant])
    engine = Engine(model, max_batch=8).start()
    try:
        batch = prompts(8, seed=11)
        params = SamplingParams(max_tokens=12, temperature=0, return_routed_experts=True)
        together = engine.generate(batch, params)
        assert [ids(c) for c in together] == [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in batch]
        layers = len(model.moe_layers())
        assert all(len(c.experts) == layers for choices in together for c in choices)
    finally:
        engine.stop()


def test_a_request_joining_a_running_batch_gets_its_lone_answer(model, engine):
    long_prompt, short_prompt = prompts(2, seed=7)
    got = {}
    first_token = threading.Event()

    def sink_long(event):
        if isinstance(event, Finished):
            got["long_done"] = event
        else:
            got.setdefault("long", []).append(event.token_id)
            first_token.set()

    engine.submit(long_prompt, SamplingParams(max_tokens=60, temperature=0), sink_long)
    first_token.wait(10)
    short = ids(engine.generate([short_prompt], SamplingParams(max_tokens=12, temperature=0))[0])
    while "long_done" not in got:
        time.sleep(0.01)
    assert got["long"] == generate(model, [long_prompt], max_new_tokens=60, temperature=0)[0]
    assert short == generate(model, [short_prompt], max_new_tokens=12, temperature=0)[0]


def test_seeded_sampling_repeats_and_matches_generate(model, engine):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=123)
    prompt = prompts(1, seed=3)[0]
    first, second = (ids(engine.generate([prompt], params)[0]) for _ in range(2))
    assert first == second
    assert first == generate(model, [prompt], max_new_tokens=20, temperature=0.9, top_p=0.95, seed=123)[0]
    other = ids(engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=124))[0])
    assert other != first


def test_stop_token_ends_the_answer_without_returning_it(model, engine):
    prompt = prompts(1, seed=4)[0]
    full = generate(model, [prompt], max_new_tokens=10, temperature=0)[0]
    stop = full[4]
    cut = ids(engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,)))[0])
    assert cut == full[: full.index(stop)]


def test_logprobs_are_the_models_log_softmax(model, engine):
    prompt = prompts(1, seed=5)[0]
    (choices,) = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=3))
    with torch.no_grad():
        logp = model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    first = choices[0]
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == logp.topk(3).indices.tolist()
    assert first.top_logprobs[0][1] == pytest.approx(first.logprob, abs=1e-6)


def test_routed_experts_are_tokens_by_layers_by_top_k(model, engine):
    prompt = prompts(1, seed=6)[0]
    (choices,) = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, return_routed_experts=True))
    assert all(len(c.experts) == 2 and all(len(layer) == 2 for layer in c.experts) for c in choices)
    assert all(0 <= e < 4 for c in choices for layer in c.experts for e in layer)
    # Capturing routing does not change the answer.
    assert ids(choices) == generate(model, [prompt], max_new_tokens=5, temperature=0)[0]


def test_cancel_frees_the_row_before_the_next_step(model):
    engine = Engine(model, max_batch=1, max_queue=4).start()
    try:
        events = []
        running = engine.submit([1, 2, 3], SamplingParams(max_tokens=90, temperature=0), events.append)
        waiting = engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0), lambda e: None)
        running.cancel()
        (done,) = engine.generate([[6]], SamplingParams(max_tokens=2, temperature=0))
        assert len(done) == 2 and waiting.generated == 3
        assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
        assert engine._running == [] and engine._cache is None
    finally:
        engine.stop()


def test_timeout_ends_a_request_with_a_timeout_event(model):
    engine = Engine(model, max_batch=2).start()
    try:
        events = []
        done = threading.Event()
        engine.submit([1], SamplingParams(max_tokens=90, timeout_s=0.0), lambda e: (events.append(e), done.set()))
        assert done.wait(10)
        assert isinstance(events[-1], Finished) and events[-1].reason == "timeout"
    finally:
        engine.stop()


def test_queue_cap_and_stopped_engine_refuse_at_once(model):
    engine = Engine(model, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    with pytest.raises(EngineStopped):
        engine.submit([1], SamplingParams(), lambda e: None)
    engine.start()
    try:
        with engine._wake:  # hold the loop so the queue stays full
            engine._waiting.append(object.__new__(type("Held", (), {})))
            with pytest.raises(QueueFull, match="queue cap"):
                engine.submit([1], SamplingParams(), lambda e: None)
            engine._waiting.clear()
    finally:
        engine.stop()


def test_combine_keeps_rows_right_aligned_and_drops_shared_padding():
    model = tiny_model(context=32)
    a, b = model.new_cache(), model.new_cache()
    model(torch.tensor([[1, 2, 3, 4, 5]]), cache=a)
    model(torch.tensor([[0, 7, 8]]), attention_mask=torch.tensor([[0, 1, 1]]), cache=b)
    merged = combine([(a, [0], [5]), (b, [0], [2])], capacity_extra=4)
    assert merged.length == 5 and merged.max_length == 9
    assert merged.mask.tolist() == [[True] * 5, [False] * 3 + [True] * 2]
    alone = combine([(merged, [1], [2])], capacity_extra=1)  # the long row left: its padding columns go
    assert alone.length == 2 and alone.mask is None
    torch.testing.assert_close(alone.keys[0][:, :, :2], b.keys[0][:, :, 1:3])


def test_prompt_scores_are_the_models_log_softmax_and_max_tokens_zero_only_scores(model, engine):
    short, long = prompts(2, seed=9)
    long = long + short  # two lengths in one prefill: left padding must not shift the scores
    events: list = []
    done = threading.Event()

    def sink(event):
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    engine.submit(short, SamplingParams(max_tokens=3, temperature=0), lambda e: None)
    engine.submit(long, SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=True), sink)
    assert done.wait(30)
    (scores,), finished = events[:-1], events[-1]
    assert isinstance(scores, PromptScores) and finished == Finished("length")  # no token was generated
    with torch.no_grad():
        logp_LV = model(torch.tensor([long])).logits[0].float().log_softmax(-1)
    assert [t.token_id for t in scores.tokens] == long and scores.tokens[0].logprob is None
    for i, scored in enumerate(scores.tokens[1:]):
        assert scored.logprob == pytest.approx(float(logp_LV[i, long[i + 1]]), abs=1e-4)
        assert [t for t, _ in scored.top_logprobs] == logp_LV[i].topk(2).indices.tolist()
    (lone,) = engine.generate([short], SamplingParams(max_tokens=3, temperature=0))
    assert len(lone) == 3 and engine._running == []
