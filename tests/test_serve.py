"""``textrnn serve``: OpenAI-shaped responses and streams, the ``openai`` client, dynamic batching,
every refusal (400/401/404/413/422/429), faults (disconnects, slow clients, shutdown) and the
playground's files.

One tiny run is trained per module and served by uvicorn on a thread, on 127.0.0.1 only. Every
request loop is bounded and stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, invoke
from serve_helpers import make_run, running, wait_for

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from textrnn.sampling import Sampler  # noqa: E402
from textrnn.serving import is_loopback, load_samplers  # noqa: E402
from textrnn.serving.app import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def sampler(run_dir) -> Sampler:
    return Sampler.from_checkpoint(run_dir, "cpu")


@pytest.fixture(scope="module")
def url(sampler):
    """The default server: default limits except a small prompt limit, 10 ms chunks."""
    app = create_app({"tiny": sampler}, Limits(max_prompt_chars=100), chunk_seconds=0.01)
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def endless_url(sampler):
    """A server whose completions may be endless (for holding streams open), at 64 streams."""
    app = create_app({"tiny": sampler}, Limits(max_tokens=10_000_000, max_streams=64), chunk_seconds=0.01)
    with running(app) as base:
        yield base


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30, **kwargs)


def sse(text: str) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def active(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).json()["active_streams"]


# ---------------------------------------------------------------- the API's shapes


def test_completion_has_openai_shape(url):
    response = post(url, {"model": "tiny", "prompt": "to be", "max_tokens": 40, "seed": 3, "temperature": 0.8})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and len(choice["text"]) == 40
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
    again = post(url, {"model": "tiny", "prompt": "to be", "max_tokens": 40, "seed": 3, "temperature": 0.8})
    assert again.json()["choices"][0]["text"] == choice["text"]  # same seed, same text


def test_list_prompts_and_n_index_choices_and_seed_plus_index(url):
    body = post(url, {"prompt": ["to be", "a rose"], "n": 2, "max_tokens": 20, "seed": 5}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    single = post(url, {"prompt": "a rose", "max_tokens": 20, "seed": 7}).json()  # choice 2: seed + 2
    assert body["choices"][2]["text"] == single["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == 2 * 5 + 2 * 6


def test_stop_ends_with_finish_reason_stop_and_drops_the_stop_string(url):
    request = {"prompt": "to be", "max_tokens": 300, "seed": 1}
    text = post(url, request).json()["choices"][0]["text"]
    stop = text[40:43]  # ends the text at its first occurrence, which may be earlier
    expected = text[:text.index(stop)]
    cut = post(url, {**request, "stop": [stop, "zzz"]}).json()
    assert cut["choices"][0] == {"text": expected, "index": 0, "logprobs": None, "finish_reason": "stop"}
    streamed = httpx.post(f"{url}/v1/completions", timeout=30, json={**request, "stop": stop, "stream": True}).text
    assert "".join(e["choices"][0]["text"] for e in sse(streamed)[:-1]) == expected


def test_stream_sends_chunks_then_done_and_matches_the_whole_response(url):
    request = {"prompt": "to be", "max_tokens": 300, "seed": 9, "temperature": 0.9, "top_k": 5, "top_p": 0.9,
               "repetition_penalty": 1.2}
    whole = post(url, request).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2  # streamed in pieces, not as one
    assert all(c["object"] == "text_completion" and c["choices"][0]["index"] == 0 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole


def test_openai_client_completes_and_streams(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="to be", max_tokens=30, seed=4, temperature=0.7,
                                           extra_body={"top_k": 10})
    assert completion.choices[0].finish_reason == "length" and len(completion.choices[0].text) == 30
    assert completion.usage.completion_tokens == 30
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt="to be", max_tokens=30, seed=4, temperature=0.7, extra_body={"top_k": 10},
        stream=True)]
    assert "".join(pieces) == completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="to be", max_tokens=5)


def test_a_byte_model_streams_whole_characters(tmp_path):
    sampler = Sampler.from_checkpoint(make_run(tmp_path, "byte"), "cpu")
    with running(create_app({"bytes": sampler}, chunk_seconds=0)) as base:
        request = {"prompt": "caf\u00e9 \u65e5\u672c", "max_tokens": 300, "seed": 2, "temperature": 1.5}
        whole = post(base, request).json()
        assert whole["usage"]["prompt_tokens"] == len("caf\u00e9 \u65e5\u672c".encode())
        events = sse(httpx.post(f"{base}/v1/completions", json={**request, "stream": True}, timeout=30).text)
        pieces = [e["choices"][0]["text"] for e in events[:-1]]
        assert "".join(pieces) == whole["choices"][0]["text"]
        assert len(pieces) > 1 and whole["usage"]["completion_tokens"] == 300  # tokens are bytes, not characters


def test_models_health_docs_and_openapi(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["cell"] == "lstm"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["models"] == ["tiny"] and health["max_streams"] == 64
    assert httpx.get(f"{url}/docs").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "max_tokens", "top_k", "repetition_penalty", "stream"} <= set(body["properties"])


def test_playground_is_self_contained_package_data(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for element in ('id="prompt"', 'id="temperature"', 'id="top_k"', 'id="top_p"', 'id="length"', 'id="model"',
                    'id="generate"', 'id="stop"'):
        assert element in page.text
    for name in ("playground.css", "playground.js"):
        assert httpx.get(f"{url}/{name}").status_code == 200
    everything = page.text + httpx.get(f"{url}/playground.css").text + httpx.get(f"{url}/playground.js").text
    assert "http://" not in everything and "https://" not in everything  # no CDN: works offline
    assert httpx.get(f"{url}/static/../../pyproject.toml").status_code == 404
    assert httpx.get(f"{url}/playground.js/../../../etc/passwd").status_code == 404


# ---------------------------------------------------------------- dynamic batching


def test_seeded_text_is_the_same_alone_and_among_31_others(endless_url):
    request = {"prompt": "to be", "max_tokens": 200, "seed": 11, "temperature": 1.0}
    alone = post(endless_url, request).json()["choices"][0]["text"]

    async def crowd() -> str:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            others = [asyncio.create_task(client.post(f"{endless_url}/v1/completions", json={
                "prompt": ["a rose", "all the", "the lady"][i % 3], "max_tokens": 2000, "seed": 100 + i,
                "temperature": [0.5, 1.0, 1.5][i % 3], "top_k": [0, 5][i % 2]})) for i in range(31)]
            for _ in range(500):  # bounded: until all 31 are in the batch
                if active(endless_url) == 31:
                    break
                await asyncio.sleep(0.01)
            assert active(endless_url) == 31
            seeded = await client.post(f"{endless_url}/v1/completions", json=request)
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            return seeded.json()["choices"][0]["text"]

    assert asyncio.run(crowd()) == alone
    assert wait_for(lambda: active(endless_url) == 0)


def test_batcher_reuses_rows_as_streams_join_and_leave(endless_url):
    """Streams of many lengths come and go; all finish with their own length, rows end at 0."""
    async def churn() -> list[dict]:
        async with httpx.AsyncClient(timeout=30) as client:
            requests = [client.post(f"{endless_url}/v1/completions", json={
                "prompt": "to be", "max_tokens": 5 + 37 * i, "seed": i}) for i in range(12)]
            return [r.json() for r in await asyncio.gather(*requests)]

    bodies = asyncio.run(churn())
    assert [len(b["choices"][0]["text"]) for b in bodies] == [5 + 37 * i for i in range(12)]
    assert wait_for(lambda: active(endless_url) == 0)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "to be", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": "to be", "temperature": -1}, 422, "temperature"),
    ({"prompt": "to be", "top_p": 0}, 422, "top_p"),
    ({"prompt": "to be", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "to be", "top_k": -1}, 422, "top_k"),
    ({"prompt": "to be", "top_k": 2.5}, 422, "top_k"),
    ({"prompt": "to be", "repetition_penalty": 0}, 422, "repetition_penalty"),
    ({"prompt": "to be", "n": 0}, 422, "n"),
    ({"prompt": "to be", "n": 17}, 422, "n"),
    ({"prompt": "to be", "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": "to be", "max_tokens": 2001}, 422, "max_tokens"),
    ({"prompt": "to be", "max_tokens": True}, 422, "max_tokens"),
    ({"prompt": "to be", "seed": -1}, 422, "seed"),
    ({"prompt": "to be", "stream": "yes"}, 422, "stream"),
    ({"prompt": 42}, 422, "prompt"),
    ({"prompt": []}, 422, "prompt"),
    ({"prompt": "x" * 101}, 422, "prompt"),
    ({"prompt": ["to be", "y" * 101]}, 422, "prompt.1"),
    ({"prompt": "to be", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"prompt": "to be", "stop": ""}, 422, "stop"),
    ({"prompt": "to be", "tempreature": 1}, 422, "tempreature"),
    ({"prompt": "to be", "echo": 1}, 422, "echo"),
    ({"prompt": "to be", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "to be", "logprobs": -1}, 422, "logprobs"),
    ({"prompt": "to be \u20ac\u00df"}, 400, "prompt"),
    ({"prompt": "to be", "model": "../../etc/passwd"}, 404, "model"),
])
def test_bad_requests_get_an_error_naming_the_field(url, body, status, field):
    response = post(url, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and field.split(".")[0] in error["message"]


def test_out_of_vocabulary_characters_are_named_or_skipped(url):
    error = post(url, {"prompt": "to be \u20ac"}).json()["error"]["message"]
    assert "'\u20ac'" in error and "unknown" in error
    skipped = post(url, {"prompt": "to be \u20ac", "unknown": "skip", "max_tokens": 5})
    assert skipped.status_code == 200 and skipped.json()["usage"]["prompt_tokens"] == 6


@pytest.mark.parametrize("raw, status", [(b"{bad json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b"", 400)])
def test_bad_json_is_400(url, raw, status):
    response = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status and response.json()["error"]["param"] == "body"


def test_a_1_mb_body_is_413_declared_or_chunked_and_the_server_keeps_serving(url):
    big = json.dumps({"prompt": "x" * 1_000_000}).encode()
    assert httpx.post(f"{url}/v1/completions", content=big).status_code == 413

    def chunked():
        for _ in range(16):
            yield b"x" * 65536

    response = httpx.post(f"{url}/v1/completions", content=chunked())  # no Content-Length
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    assert post(url, {"prompt": "to be", "max_tokens": 3}).status_code == 200


def test_api_key_guards_v1_only(sampler):
    app = create_app({"tiny": sampler}, api_key="s3cret")
    with running(app) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
                response = httpx.request(method, f"{base}{path}", headers=headers, json={"max_tokens": 2})
                assert response.status_code == 401 and response.json()["error"]["param"] == "authorization"
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{base}/v1/completions", headers=good, json={"max_tokens": 2}).status_code == 200
        assert httpx.get(f"{base}/health").json()["auth"] is True
        assert httpx.get(f"{base}/").status_code == 200


def test_the_65th_stream_against_a_limit_of_64_gets_429_at_once(endless_url):
    async def flood() -> tuple[list[int], float]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            async def hold(index: int) -> int:
                request = {"prompt": "to be", "max_tokens": 10_000_000, "stream": True, "seed": index}
                async with client.stream("POST", f"{endless_url}/v1/completions", json=request) as response:
                    if response.status_code == 200:
                        async for _ in response.aiter_bytes():
                            await asyncio.sleep(0.05)  # a reader; cancelled at the end
                    return response.status_code

            holders = [asyncio.create_task(hold(i)) for i in range(64)]
            for _ in range(1000):
                if active(endless_url) == 64:
                    break
                await asyncio.sleep(0.01)
            started = time.monotonic()
            extra = await client.post(f"{endless_url}/v1/completions", json={"prompt": "to be", "max_tokens": 5})
            waited = time.monotonic() - started
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return [extra.status_code, extra.json()["error"]["type"]], waited

    (status, kind), waited = asyncio.run(flood())
    assert status == 429 and kind == "rate_limit_error" and waited < 5  # at once: a queue would wait forever
    assert wait_for(lambda: active(endless_url) == 0)  # the 64 disconnected clients freed their rows
    assert post(endless_url, {"prompt": "to be", "max_tokens": 5}).status_code == 200


# ---------------------------------------------------------------- faults


def test_a_client_that_disconnects_mid_stream_frees_its_slot(endless_url):
    request = {"prompt": "to be", "max_tokens": 10_000_000, "stream": True}
    with httpx.stream("POST", f"{endless_url}/v1/completions", json=request, timeout=30) as response:
        chunks = response.iter_bytes()  # (an iterator dropped here would close the response)
        assert next(chunks).startswith(b"data: ")
        assert active(endless_url) == 1
    assert wait_for(lambda: active(endless_url) == 0)


def test_a_client_that_leaves_a_whole_response_frees_its_slot(endless_url):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{endless_url}/v1/completions", json={"prompt": "to be", "max_tokens": 10_000_000}, timeout=0.5)
    assert wait_for(lambda: active(endless_url) == 0, timeout=15)


def test_a_slow_client_does_not_stall_the_others(endless_url):
    """A client that never reads its stream: its socket fills, others go on at full speed."""
    host, port = endless_url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "to be", "max_tokens": 10_000_000, "stream": True}).encode()
    slow = socket.create_connection((host, int(port)))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        assert wait_for(lambda: active(endless_url) == 1)
        time.sleep(1.0)  # long enough for the unread socket's buffers to fill
        started = time.monotonic()
        for _ in range(3):
            response = post(endless_url, {"prompt": "to be", "max_tokens": 500})
            assert response.status_code == 200 and len(response.json()["choices"][0]["text"]) == 500
        assert time.monotonic() - started < 10
        assert active(endless_url) == 1  # the slow stream is still there, not dropped
    finally:
        slow.close()
    assert wait_for(lambda: active(endless_url) == 0, timeout=15)


def test_a_failing_step_ends_its_streams_with_an_error_and_the_server_goes_on(run_dir):
    sampler = Sampler.from_checkpoint(run_dir, "cpu")
    real = sampler.model.stepper
    failures = [RuntimeError("injected")]

    def stepper(precision):
        step = real(precision)

        def flaky(ids, state):
            if failures:
                raise failures.pop()
            return step(ids, state)
        return flaky

    sampler.model.stepper = stepper
    app = create_app({"tiny": sampler})
    with running(app) as base:
        failed = post(base, {"prompt": "to be", "max_tokens": 50})
        assert failed.status_code == 503 and "sampling failed: RuntimeError: injected" in failed.text
        assert app.state.slots.used == 0
        assert post(base, {"prompt": "to be", "max_tokens": 50}).status_code == 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_and_ctrl_c_end_streams_with_an_error_event_and_release_the_port(run_dir):
    """Two real ``textrnn serve`` processes (started together, to share their start-up time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEXTRNN_API_KEY": ""}
    servers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = _free_port()
        servers[sig] = port, subprocess.Popen(
            [sys.executable, "-m", "textrnn", "serve", str(run_dir), "--port", str(port), "--max-tokens", "10000000",
             "--device", "cpu"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        for sig, (port, process) in servers.items():
            base = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    return httpx.get(f"{base}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_for(up, timeout=60, every=0.1)
            request = {"prompt": "to be", "max_tokens": 10_000_000, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=request, timeout=30) as response:
                chunks = response.iter_bytes()
                received = next(chunks)
                process.send_signal(sig)
                received += b"".join(chunks)  # ends: the server closes the stream
            events = sse(received.decode())
            assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
            assert process.wait(timeout=20) == (130 if sig == signal.SIGINT else 0)  # 130: as every command
            assert "serving tiny on http://127.0.0.1" in process.stderr.read().decode()
            with socket.socket() as again:  # the port is free again
                again.bind(("127.0.0.1", port))
    finally:
        for _, process in servers.values():
            if process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------- the command and its safety defaults


def test_loopback_is_recognised():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.org"))


def test_listening_beyond_loopback_warns(run_dir, monkeypatch):
    import uvicorn

    from textrnn import serving

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # never binds: nothing listens
    said = []
    serving.serve([run_dir], host="0.0.0.0", device="cpu", log=said.append)
    assert "warning: listening on 0.0.0.0, beyond this machine" in said[0] and "--api-key" in said[0]
    said.clear()
    serving.serve([run_dir], host="127.0.0.1", device="cpu", log=said.append)
    assert not any("warning" in line for line in said)


def test_cli_passes_options_and_reads_the_key_from_the_environment(run_dir, monkeypatch):
    from textrnn import serving

    calls = []
    monkeypatch.setattr(serving, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("TEXTRNN_API_KEY", "from-env")
    result = invoke("serve", run_dir, "--port", "9001", "--max-streams", "8", "--max-n", "2")
    assert result.code == 0, result.stderr
    args, _ = calls[0]
    assert args[1:4] == ("127.0.0.1", 9001, "from-env") and args[7] == 1  # one sampling thread by default
    assert args[4] == Limits(max_streams=8, max_n=2)
    monkeypatch.delenv("TEXTRNN_API_KEY")
    assert invoke("serve", run_dir, "--api-key", "k").code == 0 and calls[1][0][3] == "k"


def test_two_runs_of_one_name_are_refused(run_dir, tmp_path):
    other = tmp_path / run_dir.name
    other.symlink_to(run_dir)
    with pytest.raises(Exception, match="both named"):
        load_samplers([run_dir, other], "cpu")
    result = invoke("serve", tmp_path / "missing")
    assert result.code == 2 and result.stderr.startswith("error: ")
