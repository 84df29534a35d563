"""The example task's data (examples/support-task/make_data.py): reproducible, valid chat data, and a
held-out test split whose questions appear nowhere in training nor among the teacher's prompts."""

import json
import subprocess
import sys
from pathlib import Path

from slmops.build.chat_data import read_chat

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "support-task" / "make_data.py"


def questions(path: Path) -> set[str]:
    return {json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()}


def test_the_support_task_is_reproducible_valid_and_its_test_split_held_out(tmp_path: Path) -> None:
    for out in (tmp_path / "a", tmp_path / "b"):
        done = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    names = ("train", "validation", "test", "prompts")
    assert all(
        (tmp_path / "a" / f"{n}.jsonl").read_bytes() == (tmp_path / "b" / f"{n}.jsonl").read_bytes() for n in names
    )

    data = tmp_path / "a"
    train, validation, test = (read_chat(data / f"{n}.jsonl") for n in ("train", "validation", "test"))
    assert len(test) >= 200 and len(train) > len(test) and validation
    held_out = questions(data / "test.jsonl")
    assert not held_out & questions(data / "train.jsonl")
    assert not held_out & questions(data / "validation.jsonl")
    assert not held_out & questions(data / "prompts.jsonl")
    for conversation in test:
        assert conversation.model_extra and conversation.model_extra["key"] in conversation.messages[-1].content
    prompts = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == len(train) and all(p["messages"][-1]["role"] == "user" for p in prompts)
