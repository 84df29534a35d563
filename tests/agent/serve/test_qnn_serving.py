"""A qnn-npu variant served by the agent through onnxruntime-qnn (here: its HTP simulator): chosen
only where an NPU is, loaded by name otherwise, answering the official `openai` client."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_agent_is_light import slmops_without_ml_frameworks

from slmops.agent import config as agent_config
from slmops.agent import hardware
from slmops.agent.choice import rank
from slmops.agent.serve.qnn_runtime import sample
from slmops.agent.serve.runtime import Sampling
from slmops.bundle import verify_bundle
from slmops.errors import RuntimeLoadError

QUESTION = [{"role": "user", "content": "Hi"}]


def test_without_an_npu_the_agent_does_not_choose_it(start_agent, qnn_bundle: Path, trusted) -> None:
    manifest = verify_bundle(qnn_bundle, trusted).manifest
    [candidate] = rank(manifest, hardware.probe(), agent_config.load())
    assert not candidate.usable and candidate.reason.startswith("provider qnn is not available here")  # the simulator
    with pytest.raises(RuntimeLoadError, match="no variant of tiny-qnn can run here"):
        start_agent().server.load_bundle(qnn_bundle)


def test_loaded_by_name_it_answers_alone_and_streamed(start_agent, qnn_bundle: Path) -> None:
    agent = start_agent()
    agent.server.load_bundle(qnn_bundle, variant_id="qnn-npu")  # as a device slot that holds it names it
    client = agent.openai()
    assert client.models.list().data[0].model_extra["variant"] == "qnn-npu"
    whole = client.chat.completions.create(model="", messages=QUESTION, max_tokens=4, temperature=0)
    assert whole.usage.completion_tokens >= 1 and whole.choices[0].finish_reason in ("length", "stop")
    streamed = client.chat.completions.create(model="", messages=QUESTION, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content


def test_agent_chat_runs_it_without_ml_frameworks(qnn_bundle: Path, signing_key) -> None:
    command = slmops_without_ml_frameworks(
        "agent", "chat", str(qnn_bundle), "Hi", "-k", str(signing_key[1]), "--variant", "qnn-npu", "--max-tokens", "3"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "qnn-npu: 3 tokens" in result.stderr


def test_sampling_from_logits() -> None:
    logits = np.array([0.1, 2.0, 1.9, -1.0, 0.5])
    rng = np.random.default_rng(0)
    assert sample(logits, Sampling(), [], rng) == 1  # greedy
    assert sample(logits, Sampling(repetition_penalty=1.5), [1], rng) == 2  # 2.0 / 1.5 falls below 1.9
    assert all(sample(logits, Sampling(temperature=1.0, top_k=1), [], rng) == 1 for _ in range(20))
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.6), [], rng) for _ in range(50)} == {1, 2}
    seeded = [sample(logits, Sampling(temperature=2.0, seed=7), [], np.random.default_rng(7)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert len({sample(logits, Sampling(temperature=5.0), [], rng) for _ in range(200)}) == 5
