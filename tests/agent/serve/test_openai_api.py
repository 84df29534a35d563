"""The OpenAI-compatible API, driven by the official `openai` client over real HTTP."""

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from slmops.agent.serve.runtime import LoadedVariant

GREEDY = {"temperature": 0, "model": ""}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def agent(start_agent, session_bundle: Path):
    return start_agent(session_bundle)


def prompt_tokens(agent, messages) -> int:
    variant: LoadedVariant = agent.server.engine.current.variant
    return len(variant.encode(variant.chat_prompt(messages)))


def test_models_lists_the_served_bundle(agent) -> None:
    models = agent.openai().models.list().data
    assert [m.id for m in models] == ["tiny:1.0.0"]
    extra = models[0].model_extra
    assert extra["variant"] == "cpu-int4" and extra["provider"] == "cpu" and extra["context_length"] == 2048


def test_chat_completion_with_usage(agent) -> None:
    reply = agent.openai().chat.completions.create(messages=QUESTION, max_tokens=8, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny:1.0.0"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == prompt_tokens(agent, QUESTION)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(agent) -> None:
    client = agent.openai()
    whole = client.chat.completions.create(messages=QUESTION, max_tokens=16, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            messages=QUESTION, max_tokens=16, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage_chunk.usage, n) for n in counts] == [getattr(whole.usage, n) for n in counts]
    # the same prompt again: all but its last token came from the prefix cache, and the text is the same
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_streamed_and_echoed(agent) -> None:
    client = agent.openai()
    prompt = "Once upon a time"
    plain = client.completions.create(prompt=prompt, max_tokens=12, **GREEDY)
    assert plain.object == "text_completion" and plain.choices[0].text
    assert plain.usage.prompt_tokens == len(agent.server.engine.current.variant.encode(prompt))
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(prompt=prompt, max_tokens=12, stream=True, **GREEDY)
    )
    assert streamed == plain.choices[0].text
    echoed = client.completions.create(prompt=prompt, max_tokens=12, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text


def test_stop_sequence_cuts_the_text(agent) -> None:
    client = agent.openai()
    full = client.completions.create(prompt="Once upon a time", max_tokens=40, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop sequence from {full!r}"
    cut = client.completions.create(prompt="Once upon a time", max_tokens=40, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    streamed = client.completions.create(prompt="Once upon a time", max_tokens=40, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_seed_makes_sampling_repeatable(agent) -> None:
    client = agent.openai()

    def sample(seed: int) -> str:
        kwargs = {"temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 16, "model": "tiny"}
        return client.chat.completions.create(messages=QUESTION, extra_body={"top_k": 50}, **kwargs).choices[0]

    first, again = sample(7), sample(7)
    assert first.message.content == again.message.content


def test_eight_concurrent_clients_each_get_their_own_answer(start_agent, session_bundle: Path) -> None:
    agent = start_agent(session_bundle, max_active_requests=4, max_queued_requests=8)
    client = agent.openai()
    prompts = [f"Tell me about the number {i}." for i in range(8)]

    def ask(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(messages=messages, max_tokens=24, **GREEDY).choices[0].message.content

    alone = [ask(p) for p in prompts]
    together: list[str | None] = [None] * 8
    peak = 0

    def run(i: int) -> None:
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, agent.server.engine.active_count)
        time.sleep(0.001)
    assert together == alone
    assert peak > 1, "requests were never served at the same time"


@pytest.mark.real_model
def test_full_queue_answers_429_with_retry_after(start_agent, smollm2_bundle: Path) -> None:
    agent = start_agent(smollm2_bundle, max_active_requests=1, max_queued_requests=1)
    client = agent.openai()
    long_answer = {"max_tokens": 150, "extra_body": {"ignore_eos": True}, **GREEDY}
    answered: list[int] = []
    refused: list[openai.RateLimitError] = []

    def ask() -> None:
        try:
            answered.append(client.chat.completions.create(messages=QUESTION, **long_answer).usage.completion_tokens)
        except openai.RateLimitError as e:
            refused.append(e)

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answered == [150, 150], "the active and the queued request are answered in full"
    assert len(refused) == 3, "five requests at once overflow one slot and one queue place"
    for e in refused:
        assert e.status_code == 429 and e.body["code"] == "queue_full"
        assert int(e.response.headers["retry-after"]) >= 1
    metrics = agent.http().get("/metrics").text
    assert 'slmops_agent_errors_total{type="queue_full"} 3.0' in metrics


@pytest.mark.real_model
def test_client_that_disconnects_stops_its_generation(start_agent, smollm2_bundle: Path) -> None:
    # The real model: the tiny one outruns HTTP, finishing before any disconnect could be seen.
    agent = start_agent(smollm2_bundle)
    stream = agent.openai().chat.completions.create(
        messages=QUESTION, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}, **GREEDY
    )
    chunks = iter(stream)
    for _ in range(5):
        next(chunks)
    stream.close()
    agent.wait_generations("cancelled", 1, timeout_s=10)
    metrics = agent.http().get("/metrics").text
    generated = next(line for line in metrics.splitlines() if line.startswith("slmops_agent_generated_tokens_total"))
    assert float(generated.split()[1]) < 100, f"{generated}: the generation went on after the client left at 5"


@pytest.mark.real_model
def test_clients_that_give_up_on_non_streaming_requests_free_the_engine(start_agent, smollm2_bundle: Path) -> None:
    """Issue 11, finding 6: eight clients that gave up after 0.5 s kept the engine busy for about
    4 minutes (2000 forced tokens each) while a normal request timed out."""
    agent = start_agent(smollm2_bundle, max_active_requests=4, max_queued_requests=8)
    body = {"messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, **GREEDY}

    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{agent.base_url}/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))

    clients = [threading.Thread(target=give_up) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    agent.wait_generations("cancelled", 8, timeout_s=10)  # 16,000 tokens would take minutes here
    agent.wait_idle(timeout_s=5)
    answered = agent.openai().chat.completions.create(messages=QUESTION, max_tokens=8, **GREEDY)
    assert answered.choices[0].message.content


def test_prompt_longer_than_the_context_is_a_400_naming_the_limit(agent) -> None:
    client = agent.openai()
    too_long = [{"role": "user", "content": "word " * 2100}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(messages=too_long, **GREEDY)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "2048 tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens asks for 5000"):
        client.chat.completions.create(messages=QUESTION, max_tokens=5000, **GREEDY)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "tiny"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "temperature"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
        (b'{"messages": [], "max_tokens": 4}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', "n"),
        (b"[1, 2, 3]", None),
    ],
)
def test_malformed_requests_are_400_in_openai_shape(agent, body: bytes, param: str | None) -> None:
    response = agent.http().post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
    assert agent.http().get("/health").status_code == 200  # and the server is still fine


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [  # issue 12's hostile run: each of these answered 500
        ("/v1/completions", b'{"prompt": ""}', "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "top_k": 9223372036854775808}', "top_k"),
        ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'\xff\xfe{"prompt": "hi"}', None),
    ],
)
def test_client_mistakes_that_were_500s_are_400s(agent, path: str, body: bytes, param: str | None) -> None:
    response = agent.http().post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_a_top_k_past_the_vocabulary_means_all_of_it(agent) -> None:
    """onnxruntime-genai refuses a top_k larger than the vocabulary (49,152 here): it was a 500."""
    sampled = agent.openai().completions.create(
        model="", prompt="hi", max_tokens=2, temperature=1, extra_body={"top_k": 49_153}
    )
    assert sampled.choices[0].finish_reason == "length"


def test_answers_outside_the_routes_are_in_the_one_error_shape(agent) -> None:
    http = agent.http()
    for response, status in ((http.get("/nope"), 404), (http.delete("/v1/models"), 405)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_a_404(agent) -> None:
    with pytest.raises(openai.NotFoundError, match="not served here"):
        agent.openai().chat.completions.create(messages=QUESTION, model="gpt-4o", max_tokens=2)


def test_api_key_is_required_when_configured(start_agent, session_bundle: Path) -> None:
    agent = start_agent(session_bundle, api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as caught:
        agent.openai(api_key="wrong").chat.completions.create(messages=QUESTION, max_tokens=2, **GREEDY)
    assert caught.value.status_code == 401
    assert agent.http().get("/v1/models").status_code == 401
    assert agent.openai(api_key="s3cret").chat.completions.create(messages=QUESTION, max_tokens=2, **GREEDY).choices
    http = agent.http()
    for path in ("/docs", "/openapi.json", "/metrics", "/nowhere"):  # the docs were open without the key
        assert http.get(path).status_code == 401, path
    assert http.get("/v1/models", headers={"Authorization": "s3cret"}).status_code == 401  # a bare key: no
    assert http.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert http.get("/health").status_code == 200
    assert http.post("/api/tags").json() == {"error": "missing or wrong API key (Authorization: Bearer ...)"}
    assert agent.http().get("/health").status_code == 200  # health stays open for supervisors


def test_health_is_503_until_a_bundle_is_loaded(start_agent, session_bundle: Path) -> None:
    agent = start_agent()
    http = agent.http()
    assert http.get("/health").status_code == 503
    assert http.get("/v1/models").json()["data"] == []
    with pytest.raises(openai.InternalServerError) as caught:
        agent.openai().chat.completions.create(messages=QUESTION, max_tokens=2, **GREEDY)
    assert caught.value.status_code == 503
    assert http.post("/admin/load", json={"bundle": str(session_bundle)}).status_code == 202
    deadline = time.monotonic() + 30
    while (health := http.get("/health")).status_code != 200:
        assert time.monotonic() < deadline, health.json()
        time.sleep(0.05)
    assert health.json() | {"bundle": "tiny", "variant": "cpu-int4", "provider": "cpu"} == health.json()


def test_metrics_in_prometheus_format(agent) -> None:
    agent.openai().chat.completions.create(messages=QUESTION, max_tokens=4, **GREEDY)
    response = agent.http().get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'slmops_agent_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'slmops_agent_generations_total{outcome="ok"} 1.0' in text
    assert 'slmops_agent_model_info{bundle="tiny",provider="cpu",variant="cpu-int4",version="1.0.0"} 1.0' in text
    for series in (
        "slmops_agent_prompt_tokens_total",
        "slmops_agent_generated_tokens_total",
        "slmops_agent_time_to_first_token_seconds_count",
        "slmops_agent_request_duration_seconds_count",
        "slmops_agent_decode_tokens_per_second_count",
        "slmops_agent_queue_depth",
        "slmops_agent_active_requests",
    ):
        assert f"\n{series} " in text, series


def test_repetition_penalty_breaks_a_loop(agent) -> None:
    client = agent.openai()

    def completion_ids(penalty: float) -> list[int]:
        text = client.completions.create(
            prompt="Once upon a time", max_tokens=30, extra_body={"repetition_penalty": penalty}, **GREEDY
        )
        return agent.server.engine.current.variant.encode(text.choices[0].text)

    looping, penalised = completion_ids(1.0), completion_ids(2.0)
    assert len(set(looping)) < len(looping), "the tiny model's greedy answer repeats tokens"
    assert len(set(penalised)) > len(set(looping))
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(prompt="Hi", max_tokens=2, extra_body={"repetition_penalty": 0}, **GREEDY)


def test_a_20_mb_prompt_is_templated_and_tokenized_off_the_event_loop(agent, monkeypatch) -> None:
    """Work that grows with the prompt runs on worker threads: /health answered in 1.9 s while a
    20 MB prompt was tokenized on the event loop."""
    import asyncio

    variant = agent.server.engine.current.variant
    calls: list[tuple[str, bool]] = []  # (method, on an event loop)

    def watched(method):
        def call(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                calls.append((method.__name__, True))
            except RuntimeError:  # no loop runs in this thread: a worker's
                calls.append((method.__name__, False))
            return method(*args, **kwargs)

        return call

    for name in ("encode", "chat_prompt"):
        monkeypatch.setattr(variant, name, watched(getattr(variant, name)))
    big = "word " * 4_000_000
    http = agent.http()
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}], "max_tokens": 1})
    completion = http.post("/v1/completions", json={"prompt": big, "max_tokens": 1})
    for answer in (chat, completion):
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert sorted(calls) == [("chat_prompt", False), ("encode", False), ("encode", False)]
