"""An openvino-cpu variant served through the agent's APIs by OpenVINO GenAI on this machine's CPU:
the bundle verifies, the agent chooses it (the NPU one has no device here), and the official
`openai` client gets the same answers alone, streamed, several at once and from the prefix cache."""

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_agent_is_light import slmops_without_ml_frameworks

from slmops.agent import config as agent_config
from slmops.agent import hardware
from slmops.agent.choice import rank
from slmops.bundle import verify_bundle

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def agent(start_agent, openvino_bundle: Path):
    return start_agent(openvino_bundle, max_active_requests=4)


def ask(client, messages, max_tokens: int = 12):
    return client.chat.completions.create(model="", messages=messages, max_tokens=max_tokens, temperature=0)


def test_the_bundle_verifies_and_the_agent_serves_the_cpu_variant(agent, openvino_bundle: Path, trusted) -> None:
    bundle = verify_bundle(openvino_bundle, trusted)
    assert [v.id for v in bundle.manifest.variants] == ["openvino-cpu", "openvino-npu"]
    assert not (openvino_bundle / "variants" / "openvino-cpu" / "inference_model.json").exists()  # Foundry: ONNX only
    models = agent.openai().models.list().data
    assert [m.id for m in models] == ["tiny-openvino:1.0.0"]
    assert models[0].model_extra["variant"] == "openvino-cpu" and models[0].model_extra["provider"] == "openvino"
    reasons = {c.variant.id: c.reason for c in rank(bundle.manifest, hardware.probe(), agent_config.load())}
    assert reasons == {"openvino-cpu": "chosen", "openvino-npu": "OpenVINO has no NPU device here (devices: CPU)"}


def test_chat_alone_streamed_and_with_usage(agent) -> None:
    client = agent.openai()
    whole = ask(client, QUESTION, max_tokens=16)
    assert whole.choices[0].message.content and whole.choices[0].finish_reason in ("length", "stop")
    assert 1 <= whole.usage.completion_tokens <= 16
    chunks = list(
        client.chat.completions.create(
            model="",
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_clients_at_once_get_the_answers_each_gets_alone(agent) -> None:
    client = agent.openai()
    questions = [
        [{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("rivers", "tea", "owls", "salt")
    ]
    alone = [ask(client, q).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = [r.choices[0].message.content for r in pool.map(lambda q: ask(client, q), questions)]
    assert together == alone
    agent.wait_idle()


def test_a_follow_up_from_the_prefix_cache_gives_the_cold_answer(start_agent, openvino_bundle: Path) -> None:
    warm = start_agent(openvino_bundle, prefix_cache_mib=64).openai()
    cold = start_agent(openvino_bundle, prefix_cache_mib=0).openai()
    messages = [
        {"role": "system", "content": "You are a careful assistant who answers in one short sentence."},
        {"role": "user", "content": "Name a river in Europe."},
    ]
    first = ask(warm, messages)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another?"},
    ]
    assert ask(warm, messages).choices[0].message.content == ask(cold, messages).choices[0].message.content


def test_the_openvino_variant_serves_without_ml_frameworks(openvino_bundle: Path, signing_key) -> None:
    command = slmops_without_ml_frameworks(
        "agent", "chat", str(openvino_bundle), "Hello", "-k", str(signing_key[1]), "--max-tokens", "3"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "openvino-cpu" in result.stderr and "tokens/s" in result.stderr


def test_the_npu_path_serves_one_request_at_a_time_with_the_cpus_answers(
    openvino_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NPU variant runs on LLMPipeline (continuous batching is CPU and GPU only); here its class
    is pointed at the CPU device, so that path runs for real."""
    from slmops.agent.serve import openvino_runtime
    from slmops.agent.serve.runtime import LoadedVariant, Sampling

    variant = openvino_export / "variants" / "openvino-npu"
    batched = LoadedVariant.load(variant, device_class="cpu")
    monkeypatch.setitem(openvino_runtime.DEVICES, "npu", "CPU")
    sequential = LoadedVariant.load(variant, device_class="npu")
    assert isinstance(sequential, openvino_runtime.OpenVinoVariant) and sequential.sequential

    def prompt(topic: str) -> list[int]:
        return batched.encode(batched.chat_prompt([{"role": "user", "content": f"Tell me about {topic}."}]))

    def run(generations: list) -> list[list[int]]:  # stepped in turn, as the engine does
        tokens: list[list[int]] = [[] for _ in generations]
        while not all(g.done for g in generations):
            for g, out in zip(generations, tokens, strict=True):
                if (token := g.step()) is not None:
                    out.append(token)
        return tokens

    prompts = [prompt(topic) for topic in ("rivers", "tea")]
    expected = run([batched.start(p, 10, Sampling()) for p in prompts])
    assert run([sequential.start(p, 10, Sampling()) for p in prompts]) == expected
    cancelled = sequential.start(prompts[0], 200, Sampling(ignore_eos=True))
    assert cancelled.step() is not None
    cancelled.release()  # the pipeline is freed for the next request
    assert run([sequential.start(prompts[1], 10, Sampling())]) == expected[1:]
