"""Ollama's API (/api/chat, /api/generate, /api/tags), for local apps that speak only that."""

import json
from pathlib import Path

import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture
def agent(start_agent, session_bundle: Path):
    return start_agent(session_bundle)


def test_tags_lists_the_model(agent) -> None:
    models = agent.http().get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == ["tiny:1.0.0"]
    assert models[0]["size"] > 0 and models[0]["details"]["quantization_level"] == "cpu-int4"
    assert agent.http().get("/api/version").json()["version"]


def test_chat_streams_ndjson_with_timings(agent) -> None:
    http = agent.http()
    whole = http.post("/api/chat", json={"messages": MESSAGES, "stream": False, "options": GREEDY}).json()
    assert whole["done"] is True and whole["message"]["role"] == "assistant"
    assert 1 <= whole["eval_count"] <= 12
    with http.stream("POST", "/api/chat", json={"messages": MESSAGES, "options": GREEDY}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *parts, last = lines
    assert all(not p["done"] for p in parts) and last["done"] is True
    assert "".join(p["message"]["content"] for p in parts) == whole["message"]["content"]
    assert last["done_reason"] == whole["done_reason"]
    assert last["eval_count"] == whole["eval_count"] and last["prompt_eval_count"] == whole["prompt_eval_count"]
    for key in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[key], int) and last[key] > 0, key
    assert last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"]


def test_generate_with_system_prompt_and_raw(agent) -> None:
    http = agent.http()
    templated = http.post(
        "/api/generate", json={"prompt": "Hi", "system": "Be brief.", "stream": False, "options": GREEDY}
    )
    raw = http.post("/api/generate", json={"prompt": "Hi", "raw": True, "stream": False, "options": GREEDY})
    assert templated.status_code == raw.status_code == 200
    variant = agent.server.engine.current.variant
    expected_prompt = variant.chat_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert templated.json()["prompt_eval_count"] == len(variant.encode(expected_prompt))
    assert raw.json()["prompt_eval_count"] == len(variant.encode("Hi"))
    assert raw.json()["response"]


def test_bad_requests_get_ollama_errors(agent) -> None:
    http = agent.http()
    missing = http.post("/api/chat", json={"model": "tiny"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]
    wrong_model = http.post("/api/generate", json={"model": "llama3", "prompt": "hi", "stream": False})
    assert wrong_model.status_code == 404 and "not served here" in wrong_model.json()["error"]
    too_long = http.post("/api/generate", json={"prompt": "word " * 2100, "raw": True, "stream": False})
    assert too_long.status_code == 400 and "2048 tokens" in too_long.json()["error"]
    # issue 12's hostile run: these answered a plain-text 500
    for options in ({"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}):
        refused = http.post("/api/generate", json={"prompt": "hi", "stream": False, "options": options})
        assert refused.status_code == 400 and "stop takes up to 4 non-empty sequences" in refused.json()["error"]
    surrogate = b'{"prompt": "\\ud800", "stream": false}'
    refused = http.post("/api/generate", content=surrogate, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "not valid Unicode" in refused.json()["error"]


def test_unlimited_num_predict_is_bounded_by_the_agents_default(start_agent, session_bundle: Path) -> None:
    agent = start_agent(session_bundle, default_max_tokens=20)
    reply = agent.http().post(
        "/api/generate", json={"prompt": "Hi", "stream": False, "options": {"num_predict": -1, "temperature": 0}}
    )
    assert reply.status_code == 200 and 1 <= reply.json()["eval_count"] <= 20
