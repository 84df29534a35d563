"""Loading bundles into a serving agent: fallback when a variant will not load, hot swap, refusals."""

import threading
import time
from pathlib import Path

import pytest

from slmops.agent import hardware
from slmops.agent.host import ModelHost
from slmops.errors import SlmopsError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


REAL_PROBE = hardware.probe


def with_cuda(data_dir: Path | None = None) -> hardware.HardwareProfile:
    """This machine, claiming a CUDA GPU that onnxruntime-genai will then fail to use."""
    profile = REAL_PROBE(data_dir)
    cuda = hardware.Accelerator(provider="cuda", onnxruntime_name="CUDAExecutionProvider", device="claimed GPU")
    return profile.model_copy(update={"accelerators": [*profile.accelerators, cuda]})


def test_a_variant_that_fails_to_load_falls_back_to_the_next(
    start_agent, gpu_and_cpu_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "probe", with_cuda)
    agent = start_agent(gpu_and_cpu_bundle)
    health = agent.http().get("/health").json()
    assert (health["variant"], health["provider"]) == ("cpu-int4", "cpu")
    assert len(health["fallbacks"]) == 1
    assert health["fallbacks"][0].startswith("cuda-int4: onnxruntime-genai cannot load")
    assert agent.openai().chat.completions.create(model="", messages=QUESTION, max_tokens=3).choices


def test_a_device_with_no_usable_variant_says_why(signing_key, gpu_and_cpu_bundle: Path, tmp_path: Path) -> None:
    from slmops.agent import config as agent_config

    server = ModelHost(agent_config.load(trusted_keys=[signing_key[1]], data_dir=tmp_path, forbid_providers=["cpu"]))
    try:
        with pytest.raises(
            SlmopsError, match=r"no variant of tiny-gpu can run here .*cpu-int4: provider cpu is forbidden"
        ):
            server.load_bundle(gpu_and_cpu_bundle)
        assert server.status.state == "failed" and server.engine.current is None
    finally:
        server.close()


@pytest.mark.real_model
def test_hot_swap_finishes_in_flight_requests_on_the_old_model(
    start_agent, smollm2_bundle: Path, second_bundle: Path
) -> None:
    agent = start_agent(smollm2_bundle, max_active_requests=4)
    client = agent.openai()
    results: dict[int, dict] = {}

    def in_flight(i: int) -> None:
        stream = client.chat.completions.create(
            model="",
            messages=QUESTION,
            max_tokens=60,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        results[i] = {
            "models": {c.model for c in chunks},
            "tokens": chunks[-1].usage.completion_tokens,
            "ended": time.monotonic(),
        }

    threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while agent.server.engine.active_count < 4:
        time.sleep(0.005)
    http = agent.http()
    assert http.post("/admin/load", json={"bundle": str(second_bundle)}).status_code == 202
    while (health := http.get("/health").json())["model"] != "tiny:2.0.0":
        assert health["status"] == "ok", health  # the old model answers health while the new one loads
        time.sleep(0.01)
    swapped_at = time.monotonic()
    after = client.chat.completions.create(model="", messages=QUESTION, max_tokens=3)
    assert after.model == "tiny:2.0.0" and health["variant"] == "cpu-fp32"
    for t in threads:
        t.join()
    assert all(r["models"] == {"smollm2-135m-instruct:1.0.0"} and r["tokens"] == 60 for r in results.values())
    assert all(r["ended"] > swapped_at for r in results.values()), "the swap happened while requests were in flight"


def test_a_bad_bundle_is_refused_and_the_old_one_keeps_serving(
    start_agent, session_bundle: Path, bundle_dir: Path
) -> None:
    agent = start_agent(session_bundle)
    http = agent.http()
    (bundle_dir / "variants" / "cpu-int4" / "genai_config.json").write_text("{}")
    assert http.post("/admin/load", json={"bundle": str(bundle_dir)}).status_code == 202
    deadline = time.monotonic() + 30
    while (health := http.get("/health").json())["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health["status"] == "ok" and health["version"] == "1.0.0"
    assert "genai_config.json: size 2 bytes, manifest says" in health["message"]
    missing = http.post("/admin/load", json={"bundle": str(bundle_dir / "nowhere")})
    assert missing.status_code == 400 and "not a bundle folder" in missing.json()["error"]["message"]


def test_a_load_that_fails_with_any_exception_leaves_a_true_status(
    start_agent, session_bundle: Path, signing_key, tmp_path: Path
) -> None:
    """Issue 12: a variant the manifest does not list raised KeyError, which load_bundle did not
    catch: the status stayed at `loading` and /admin/load answered 409 until another load worked."""
    from slmops.agent import config as agent_config

    server = ModelHost(agent_config.load(trusted_keys=[signing_key[1]], data_dir=tmp_path))
    try:
        with pytest.raises(SlmopsError, match="has no variant 'npu-int4'"):
            server.load_bundle(session_bundle, "npu-int4")
        assert server.status.state == "failed" and "has no variant 'npu-int4'" in server.status.message
    finally:
        server.close()

    agent = start_agent(session_bundle)
    loader = agent.server.load_bundle_in_background(session_bundle, "npu-int4")
    loader.join(timeout=30)
    health = agent.http().get("/health").json()
    assert health["state"] == "ready" and "not loaded: bundle tiny 1.0.0 has no variant 'npu-int4'" in health["message"]
    assert agent.http().post("/admin/load", json={"bundle": str(session_bundle)}).status_code == 202  # not 409
