"""Log-probabilities: ``Sampler.score``, and the server's ``logprobs`` and ``echo`` (OpenAI's shape),
checked against ``evaluate``'s loss on the same text and read by the real ``openai`` client."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from serve_helpers import LINES, make_run, running

from textrnn.evaluation import evaluate_ids
from textrnn.sampling import Sampler

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from textrnn.serving.app import Limits, create_app  # noqa: E402

TEXT = LINES[0] + "\n" + LINES[1]


@pytest.fixture(scope="module")
def sampler(tmp_path_factory) -> Sampler:
    return Sampler.from_checkpoint(make_run(tmp_path_factory.mktemp("logprobs-run")), "cpu", precision="fp32")


@pytest.fixture(scope="module")
def url(sampler):
    with running(create_app({"tiny": sampler}, Limits(max_logprobs=8), chunk_seconds=0.0)) as base:
        yield base


def test_score_sums_to_minus_the_evaluate_loss(sampler):
    """evaluate scores every token after the first, from a zero state, the state carried: so does score."""
    scores = sampler.score(TEXT, top=3, chunk=7)  # small chunks: the state must carry across them
    ids = np.array(sampler.tokenizer.encode(TEXT))
    loss_sum, count = evaluate_ids(sampler.model, ids, seq_len=16, streams=1, device=sampler.device)
    assert count == len(ids) - 1 and scores.logprobs[0] is None and scores.top[0] is None
    assert abs(scores.total + loss_sum) < 1e-4
    assert "".join(scores.tokens) == TEXT and scores.text_offset[5] == 5
    for token, logprob, top in zip(scores.tokens[1:], scores.logprobs[1:], scores.top[1:]):
        assert len(top) == 3 and logprob <= 0 and list(top.values()) == sorted(top.values(), reverse=True)
        assert logprob <= max(top.values()) + 1e-6 and (token not in top or abs(top[token] - logprob) < 1e-5)
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5


def test_echo_with_max_tokens_0_scores_the_prompt_like_score_and_evaluate(url, sampler):
    body = httpx.post(f"{url}/v1/completions", json={"prompt": TEXT, "max_tokens": 0, "echo": True,
                                                     "logprobs": 2}, timeout=30).json()
    choice = body["choices"][0]
    scores = sampler.score(TEXT, top=2)
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == scores.tokens and lp["text_offset"] == scores.text_offset
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert np.allclose(lp["token_logprobs"][1:], scores.logprobs[1:], atol=1e-6)
    ids = np.array(sampler.tokenizer.encode(TEXT))
    loss_sum, _ = evaluate_ids(sampler.model, ids, seq_len=32, streams=1, device=sampler.device)
    assert abs(math.fsum(lp["token_logprobs"][1:]) + loss_sum) < 1e-4
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize("stream", [False, True])
def test_generated_logprobs_are_the_models_own(url, sampler, stream):
    """The completion's logprobs, streamed or not, are what score gives the prompt + completion."""
    prompt = "to be or"
    request = {"prompt": prompt, "max_tokens": 24, "logprobs": 3, "echo": True, "seed": 5, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=30) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        parts = [c["choices"][0] for c in chunks]
        text = "".join(p["text"] for p in parts)
        lp = {key: sum((p["logprobs"][key] for p in parts), []) for key in parts[0]["logprobs"]}
    else:
        choice = httpx.post(f"{url}/v1/completions", json=request, timeout=30).json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
    scores = sampler.score(text, top=3)
    assert text.startswith(prompt) and len(text) == len(prompt) + 24
    assert lp["tokens"] == scores.tokens and lp["text_offset"] == scores.text_offset
    assert np.allclose(lp["token_logprobs"][1:], scores.logprobs[1:], atol=1e-4)
    for got, want in zip(lp["top_logprobs"][1:], scores.top[1:]):
        assert got.keys() == want.keys() and np.allclose(list(got.values()), list(want.values()), atol=1e-4)


def test_logprobs_stop_where_a_stop_string_cuts_the_text(url):
    choice = httpx.post(f"{url}/v1/completions", json={"prompt": "to", "max_tokens": 200, "logprobs": 1,
                                                       "stop": " ", "seed": 1}, timeout=30).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]).startswith(choice["text"])
    assert all(offset < max(len(choice["text"]), 1) for offset in lp["text_offset"])


def test_logprobs_above_the_limit_is_refused_naming_the_field(url, sampler):
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "to", "logprobs": 9}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
    assert "limit of 8" in response.json()["error"]["message"]


def test_the_openai_client_reads_logprobs(url, sampler):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    scored = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].logprobs.tokens == sampler.score(TEXT).tokens
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    parts = list(client.completions.create(model="tiny", prompt="to", max_tokens=5, logprobs=2, stream=True,
                                           seed=3))
    tokens = [t for p in parts for t in p.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(p.choices[0].text for p in parts) and len(tokens) == 5
    assert all(len(top) == 2 for p in parts for top in p.choices[0].logprobs.top_logprobs)


def test_stream_yields_logprobs_beside_the_same_text(sampler):
    prompt = "to be"
    plain = "".join(sampler.stream(prompt, length=40, temperature=0.9, seed=11))
    items = list(sampler.stream(prompt, length=40, temperature=0.9, seed=11, logprobs=3))
    assert "".join(piece for piece, _ in items) == plain
    entries = [entry for _, batch in items for entry in batch]
    scores = sampler.score(prompt + plain, top=3)
    assert [e.token for e in entries] == scores.tokens[len(prompt):]
    assert np.allclose([e.logprob for e in entries], scores.logprobs[len(prompt):], atol=1e-4)
    assert all(e.top.keys() == top.keys() for e, top in zip(entries, scores.top[len(prompt):]))
    with pytest.raises(Exception, match="logprobs"):
        sampler.stream(prompt, logprobs=-1)


def test_scoring_streamed_is_one_chunk_per_choice(url, sampler):
    request = {"prompt": [TEXT, "to be"], "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    choices = [json.loads(line[6:])["choices"][0] for line in lines[:-1]]
    assert [c["text"] for c in choices] == [TEXT, "to be"] and {c["finish_reason"] for c in choices} == {"length"}
    assert choices[1]["logprobs"]["tokens"] == list("to be")
    assert np.allclose(choices[1]["logprobs"]["token_logprobs"][1:], sampler.score("to be").logprobs[1:], atol=1e-6)
