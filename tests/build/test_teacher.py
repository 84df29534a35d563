"""Distillation's first stage (slmops.build.teacher) on the tiny model: the teacher's answers with their
top-k log-probabilities, duplicates and truncated answers filtered and counted, and a run that was
interrupted (even mid-line) resumed without answering anything twice."""

import json
from pathlib import Path

import pytest

from slmops.build.chat_data import ChatDataError, read_chat
from slmops.build.teacher import ANSWERS, FILTERED, PROVENANCE, GenerateSettings, generate
from slmops.errors import BuildError


def prompts_file(path: Path, count: int, duplicate: bool = False) -> Path:
    rows = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"What does error E{i} mean?"}]} for i in range(count)
    ]
    if duplicate:
        rows.append({"id": "again", "messages": rows[0]["messages"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_an_interrupted_run_resumes_and_answers_each_prompt_once(tiny_model: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path / "p.jsonl", 10)
    out = tmp_path / "data"
    settings = GenerateSettings(max_new_tokens=4, batch_size=4, keep_truncated=True, temperature=1.0)

    def interrupt(done: int, _total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(str(tiny_model), prompts, out, settings, on_batch=interrupt)
    first = ids(out / ANSWERS) + (ids(out / FILTERED) if (out / FILTERED).exists() else [])
    assert sorted(first) == ["q0", "q1", "q2", "q3"]
    with (out / ANSWERS).open("a") as torn:  # killed while writing the next line
        torn.write('{"id": "q4", "messages": [{"role": "us')
    progress: list[int] = []
    record = generate(str(tiny_model), prompts, out, settings, on_batch=lambda done, _t: progress.append(done))
    answered = ids(out / ANSWERS) + (ids(out / FILTERED) if (out / FILTERED).exists() else [])
    assert sorted(answered) == sorted(f"q{i}" for i in range(10)), "each prompt once"
    assert progress == [8, 10], "only the six left were answered"
    assert record["counts"]["prompts"] == 10 and record["counts"]["kept"] == len(ids(out / ANSWERS)) >= 5
    assert len(read_chat(out / ANSWERS)) == record["counts"]["kept"], "the answers are chat data for the student"
    with pytest.raises(BuildError, match="other settings"):
        generate(str(tiny_model), prompts, out, GenerateSettings(max_new_tokens=5))


def test_duplicates_and_truncated_answers_are_filtered_and_counted(tiny_model: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path / "p.jsonl", 3, duplicate=True)
    settings = GenerateSettings(max_new_tokens=3, batch_size=2, temperature=1.0)
    record = generate(str(tiny_model), prompts, tmp_path / "d", settings)
    greedy = generate(str(tiny_model), prompts, tmp_path / "g", GenerateSettings(max_new_tokens=3))
    assert greedy["counts"]["empty"] == 3, "a random model's greedy answer is blank lines: empty, filtered"
    filtered = [json.loads(line) for line in (tmp_path / "d" / FILTERED).read_text().splitlines()]
    assert {"id": "again", "why": "duplicate"} in filtered
    counts = record["counts"]
    assert counts["prompts"] == 4 and counts["duplicate"] == 1
    assert counts["kept"] + counts.get("truncated", 0) + counts.get("empty", 0) == 3
    assert counts.get("truncated", 0) >= 1, "a random model rarely ends an answer within 3 tokens"
    saved = json.loads((tmp_path / "d" / PROVENANCE).read_text())
    assert saved["teacher"]["digest"] and saved["prompts"]["sha256"] and saved == record


def test_the_top_k_log_probabilities_are_the_teachers_distribution(tiny_model: Path, tmp_path: Path) -> None:
    """Sampled answers (a random model's greedy answer is blank lines): each stored step's top 3 is what
    the teacher, run again over the prompt and the tokens it generated, gives at that position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    settings = GenerateSettings(max_new_tokens=6, batch_size=1, top_k_logprobs=3, keep_truncated=True, temperature=1)
    generate(str(tiny_model), prompts, tmp_path / "k", settings)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    items = [json.loads(line) for line in (tmp_path / "k" / ANSWERS).read_text().splitlines()]
    assert items
    for item in items:
        steps, answer = item["top_logprobs"], item["answer_ids"]
        assert 1 <= len(steps) == len(answer) <= 6 and all(len(step) == 3 for step in steps)
        prompt = tokenizer.apply_chat_template(item["messages"][:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt_ids + answer])).logits[0]
        for position, step in enumerate(steps):
            values, top = torch.log_softmax(logits[len(prompt_ids) + position - 1], -1).topk(3)
            assert [i for i, _ in step] == top.tolist()
            assert [v for _, v in step] == pytest.approx(values.tolist(), abs=1e-3)


def test_prompts_that_cannot_be_answered_are_refused_by_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n'
        '{"messages": []}\n'
    )
    with pytest.raises(ChatDataError) as refused:
        generate("unused", bad, tmp_path / "x", GenerateSettings())
    assert "line 1: the last turn is the assistant's" in str(refused.value) and "line 3: messages" in str(refused.value)


def test_the_cli_answers_and_shows_the_counts(tiny_model: Path, tmp_path: Path) -> None:
    import subprocess

    from support import SLMOPS

    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    command = [*SLMOPS, "build", "distill", "generate", "--teacher", str(tiny_model), "--prompts", str(prompts)]
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "o"), "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "prompts" in done.stdout and json.loads((tmp_path / "o" / PROVENANCE).read_text())["counts"]["prompts"] == 3
