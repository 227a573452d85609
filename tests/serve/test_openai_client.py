"""The official openai client against a live server: completions and chat, streaming and not, usage, seeds,
logprobs, n, echo, stop strings and the routed-experts extension."""

from __future__ import annotations

import pytest
import torch

from moekit.data.tokenizers import ByteTokenizer
from moekit.inference import generate

from .server import MODEL_NAME, post_json

openai = pytest.importorskip("openai")

PROMPT = "The experts say"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(model, prompt: str, n: int) -> str:
    tok = ByteTokenizer()
    return tok.decode(generate(model, [tok.encode(prompt)], max_new_tokens=n, temperature=0)[0])


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_completion_is_the_greedy_continuation_with_usage(client, model):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = response.choices
    assert choice.text == greedy_text(model, PROMPT, 12)
    assert choice.finish_reason == "length"
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(PROMPT), 12)
    assert response.usage.total_tokens == len(PROMPT) + 12


def test_streamed_completion_equals_the_whole_one_and_reports_usage_last(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    assert len({c.id for c in chunks}) == 1
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks[:-1]] == [None] * (len(text_chunks) - 1)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert all(c.usage is None for c in text_chunks)


def test_chat_uses_the_plain_template_and_streams_the_same_text(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=15, temperature=0)
    (choice,) = response.choices
    full = greedy_text(model, "System: Be brief.\nUser: Hi\nAssistant:", 15)
    assert choice.message.role == "assistant"
    assert choice.message.content == full.split("\nUser:")[0]
    assert response.object == "chat.completion" and response.usage.prompt_tokens == len(
        "System: Be brief.\nUser: Hi\nAssistant:"
    )
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=15, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_same_seed_same_text_other_seed_other_text(client):
    def sample(seed):
        r = client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logprobs_of_completion_and_chat(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(t if not t.startswith("token_id:") else "\ufffd" for t in lp.tokens) == r.choices[0].text
    assert all(len(top) == 3 for top in lp.top_logprobs)  # distinct tokens keep distinct keys
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) <= 3 and logprob == pytest.approx(max(top.values()))
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 3
    assert all(len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_n_choices_echo_and_stop_string(client, model):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy_text(model, PROMPT, 5)
    streamed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
    full = greedy_text(model, PROMPT, 12)
    stop = full[5:7]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt_and_max_tokens_zero_only_scores_it(client, model):
    """The legacy completions scoring call (lm-evaluation-harness's loglikelihood): echo, logprobs, max_tokens 0."""
    prompt_ids = ByteTokenizer().encode(PROMPT)
    with torch.no_grad():
        logp_LV = model(torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)
    expected = [None] + [float(logp_LV[i, t]) for i, t in enumerate(prompt_ids[1:])]
    scored = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert "".join(lp.tokens) == PROMPT and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert lp.text_offset == [i for i in range(len(PROMPT))]  # one byte per token here
    both = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                     temperature=0)  # fmt: skip
    lp = both.choices[0].logprobs
    assert both.choices[0].text == PROMPT + greedy_text(model, PROMPT, 4) and len(lp.tokens) == len(PROMPT) + 4
    assert lp.token_logprobs[1 : len(PROMPT)] == pytest.approx(expected[1:], abs=1e-4)
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                              temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens
    offsets = [o for c in streamed for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    with pytest.raises(openai.BadRequestError, match="at least 1"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0)


def test_routed_experts_extension_is_tokens_by_layers_by_top_k(server):
    status, body = post_json(server, "/v1/completions", {
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "return_routed_experts": True,
    })  # fmt: skip
    assert status == 200
    experts = body["choices"][0]["routed_experts"]
    assert len(experts) == 5 and all(len(layer) == 2 and len(layer[0]) == 2 for layer in experts)
