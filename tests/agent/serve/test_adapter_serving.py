"""A bundle whose variant carries two LoRA adapters: each request picks one by model name (`bundle:adapter`)
through the official openai client and Ollama's API; the base stays what it was."""

import threading
from pathlib import Path

import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NAMES = ["tiny:1.0.0", "tiny:terse", "tiny:verbose"]


@pytest.fixture
def agent(start_agent, adapter_bundle: Path):
    return start_agent(adapter_bundle, prefix_cache_mib=64)


def answer(agent, model: str, max_tokens: int = 12) -> str:
    reply = agent.openai().chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    assert reply.model == (model if model.count(":") < 2 else "tiny:" + model.rsplit(":", 1)[1])
    return reply.choices[0].message.content


def test_models_and_tags_list_the_base_then_each_adapter(agent) -> None:
    cards = agent.openai().models.list().data
    assert [c.id for c in cards] == NAMES
    assert [c.model_extra["adapter"] for c in cards] == [None, "terse", "verbose"]
    assert {c.model_extra["variant"] for c in cards} == {"cpu-int4"}
    tags = agent.http().get("/api/tags").json()["models"]
    assert [t["name"] for t in tags] == NAMES


def test_each_adapter_answers_differently_and_the_base_as_without_adapters(
    agent, start_agent, session_bundle: Path
) -> None:
    answers = {name: answer(agent, name) for name in NAMES}
    assert len(set(answers.values())) == 3, answers
    plain = start_agent(session_bundle)  # the same int4 weights, built without adapters
    assert answer(plain, "tiny:1.0.0") == answers["tiny:1.0.0"]
    assert answer(agent, "tiny:1.0.0:terse") == answers["tiny:terse"]
    ollama = agent.http().post(
        "/api/chat",
        json={
            "model": "tiny:verbose",
            "messages": QUESTION,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 12},
        },
    )
    assert ollama.json()["model"] == "tiny:verbose"
    assert ollama.json()["message"]["content"] == answers["tiny:verbose"]


def test_requests_for_different_adapters_interleave_without_mixing(agent) -> None:
    """The engine steps every request in turn; each generator keeps its own adapter (and the prefix cache
    never hands one adapter's generator to another's request)."""
    alone = {name: answer(agent, name, max_tokens=24) for name in NAMES}
    together: dict[str, str] = {}

    def ask(name: str) -> None:
        together[name] = answer(agent, name, max_tokens=24)

    threads = [threading.Thread(target=ask, args=(name,)) for name in NAMES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert together == alone


def test_an_adapter_the_variant_lacks_is_a_404_naming_what_is_served(agent) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        agent.openai().chat.completions.create(model="tiny:chatty", messages=QUESTION, max_tokens=4)
    message = error.value.body["message"]
    assert "'tiny:chatty' is not served here" in message and "'tiny:terse'" in message
