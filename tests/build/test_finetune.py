"""Fine-tuning on chat data (slmops.build.finetune, slmops.build.chat_data) on the tiny model: only answers
are learned, LoRA trains and its merge matches the unmerged model, a stopped run resumes, early stopping,
and bad data or settings are refused before any work."""

import json
from pathlib import Path

import pytest

from slmops.build.chat_data import IGNORE, ChatDataError, Conversation, read_chat, tokenize
from slmops.build.finetune import FinetuneSettings, finetune
from slmops.errors import BuildError, ConfigError

FACTS = [
    ("The X10 router blinks red.", "Error E41: the uplink is down. Reseat the WAN cable."),
    ("The K2 kettle shows E7.", "Error E7: scale in the boiler. Run the descale cycle."),
    ("My P3 printer says E12.", "Error E12: paper jam at the rear. Open the back door and clear it."),
    ("The T5 thermostat reads --.", "Error E3: the sensor is loose. Push the sensor plug in."),
]


def chat_file(path: Path, pairs: list[tuple[str, str]], copies: int = 1) -> Path:
    lines = []
    for _ in range(copies):
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_only_the_answers_and_their_end_of_turn_are_learned(tokenizer) -> None:
    conversation = Conversation.model_validate(
        {
            "messages": [
                {"role": "system", "content": "You fix devices."},
                {"role": "user", "content": "The K2 kettle shows E7."},
                {"role": "assistant", "content": "Run the descale cycle."},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Rinse twice."},
            ]
        }
    )
    example = tokenize(tokenizer, conversation, max_length=512)
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert learned.replace("\n", "") == "Run the descale cycle.<|im_end|>Rinse twice.<|im_end|>"
    assert len(example.labels) == len(example.input_ids)
    cut = tokenize(tokenizer, conversation, max_length=10)
    assert len(cut.input_ids) == 10 and set(cut.labels) == {IGNORE}, "the system prompt is not learned"


def test_bad_lines_are_all_named_with_their_numbers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "{not json\n"
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n'
        '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
    )
    with pytest.raises(ChatDataError) as refused:
        read_chat(bad)
    message = str(refused.value)
    assert "3 bad line(s)" in message
    assert (
        "line 2: not JSON" in message
        and "line 3: no assistant turn" in message
        and "line 4: messages.0.role" in message
    )
    with pytest.raises(ChatDataError, match="no such file"):
        read_chat(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChatDataError, match="no conversations"):
        read_chat(tmp_path / "empty.jsonl")


def test_settings_that_cannot_work_are_refused_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    data = chat_file(tmp_path / "d.jsonl", FACTS)
    with pytest.raises(ValueError, match="LoRA's"):
        FinetuneSettings(method="full", merge=True)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        finetune(str(tiny_model), data, tmp_path / "q", FinetuneSettings(qlora=True))
    with pytest.raises(BuildError, match="nothing to resume"):
        finetune(str(tiny_model), data, tmp_path / "r", FinetuneSettings(), resume=True)


def test_lora_learns_the_answers_and_its_merge_matches_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = chat_file(tmp_path / "train.jsonl", FACTS, copies=8)
    validation = chat_file(tmp_path / "val.jsonl", FACTS)
    settings = FinetuneSettings(epochs=4, learning_rate=1e-2, batch_size=4, rank=8, patience=4)
    steps: list[int] = []
    record = finetune(
        str(tiny_model), data, tmp_path / "lora", settings, validation, on_step=lambda s, _t, _f: steps.append(s)
    )

    losses = [e["validation_loss"] for e in record["epochs"]]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True) and losses[0] - losses[-1] > 0.2, losses
    assert record["output"] == "adapter" and 0 < record["trainable_parameters"] < 100_000
    assert record["data"]["sha256"] and record["base"]["digest"] and steps[-1] == record["steps"]
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "lora" / "finetune.json").read_text()) == record

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        unmerged = adapted(ids).logits
        merged = adapted.merge_and_unload()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert not torch.allclose(plain, unmerged, atol=1e-3), "the adapter changed the model"


def test_a_stopped_run_resumes_from_its_last_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    data = chat_file(tmp_path / "train.jsonl", FACTS, copies=2)
    out = tmp_path / "run"
    first = finetune(str(tiny_model), data, out, FinetuneSettings(epochs=1, batch_size=4, merge=True))
    assert first["output"] == "model" and (out / "model.safetensors").is_file()
    with pytest.raises(BuildError, match="not empty"):
        finetune(str(tiny_model), data, out, FinetuneSettings(epochs=2, batch_size=4, merge=True))
    again = finetune(str(tiny_model), data, out, FinetuneSettings(epochs=2, batch_size=4, merge=True), resume=True)
    assert [e["epoch"] for e in again["epochs"]] == [1, 2], "epoch 1 from the first run, epoch 2 resumed"
    assert again["epochs"][0] == first["epochs"][0]
    assert again["steps"] == 2 * first["steps"]


def test_training_stops_when_the_validation_loss_stops_improving(tiny_model: Path, tmp_path: Path) -> None:
    """Every weight trained hard on four answers overfits them: the loss on unrelated answers soon rises."""
    data = chat_file(tmp_path / "train.jsonl", FACTS, copies=4)
    unrelated = chat_file(tmp_path / "val.jsonl", [("Capital of France?", "Paris, on the Seine.")] * 4)
    settings = FinetuneSettings(method="full", epochs=8, learning_rate=3e-2, batch_size=4, patience=1)
    record = finetune(str(tiny_model), data, tmp_path / "early", settings, unrelated)
    losses = [e["validation_loss"] for e in record["epochs"]]
    assert record["stopped_early"] and len(losses) < 8
    assert losses.index(min(losses)) + 1 == record["best_epoch"] == len(losses) - 1, "one epoch of patience"
    assert record["output"] == "model" and (tmp_path / "early" / "model.safetensors").is_file()


def test_the_cli_trains_shows_each_epoch_and_refuses_bad_settings_with_code_2(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess

    from support import SLMOPS

    data = chat_file(tmp_path / "train.jsonl", FACTS, copies=2)
    command = [*SLMOPS, "build", "finetune", str(tiny_model), "--data", str(data), "-o", str(tmp_path / "out")]
    done = subprocess.run([*command, "--epochs", "2", "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "validation loss" in done.stdout and "(best)" in done.stdout
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["settings"]["rank"] == 4
    bad = subprocess.run([*command, "--method", "full", "--merge"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "LoRA's" in bad.stderr


def test_two_processes_under_torchrun_train_what_one_process_trains(tiny_model: Path, tmp_path: Path) -> None:
    """DDP over gloo with two CPU processes of batch 2 takes the same steps as one process of batch 4."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    data = chat_file(tmp_path / "train.jsonl", FACTS, copies=4)
    validation = chat_file(tmp_path / "val.jsonl", FACTS)
    args = ["-m", "slmops", "build", "finetune", str(tiny_model), "--data", str(data), "--validation", str(validation),
            "--method", "full", "--epochs", "2", "--learning-rate", "1e-2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "one": [sys.executable, "-P", *args, "--batch-size", "4", "-o", str(tmp_path / "one")],
        "two": [*torchrun, *args, "--batch-size", "2", "-o", str(tmp_path / "two")],
    }
    for name, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    one, two = (json.loads((tmp_path / n / "finetune.json").read_text()) for n in ("one", "two"))
    assert one["steps"] == two["steps"]
    assert [e["validation_loss"] for e in two["epochs"]] == pytest.approx(
        [e["validation_loss"] for e in one["epochs"]], rel=1e-5
    )
    weights_one, weights_two = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two"))
    assert all(torch.allclose(weights_one[k], weights_two[k], atol=1e-5) for k in weights_one)
