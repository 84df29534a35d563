"""Distillation's second stage (slmops.build.distill) on tiny models: the loss falls and the student's
agreement with the teacher rises, from a stored top-k distribution and from a live teacher; GJSD is the
divergence it says it is."""

import json
import math
from pathlib import Path

import pytest

from slmops.build.chat_data import ChatDataError
from slmops.build.distill import DistillSettings, distill, gjsd
from slmops.build.teacher import GenerateSettings, generate
from slmops.errors import BuildError

QUESTIONS = [f"Device D{i} shows error E{i * 7 % 90}. What now?" for i in range(24)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer tiny model taught one answer pattern (a random model's distribution is near uniform: there
    is nothing to distil, and its most likely token is arbitrary)."""
    from slmops.build import models
    from slmops.build.finetune import FinetuneSettings, finetune

    folder = tmp_path_factory.mktemp("teacher")
    untaught = models.make_tiny(folder / "random", layers=6, seed=5)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Restart D{i}, then check."}]}
        for i, q in enumerate(QUESTIONS)
    ]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = FinetuneSettings(method="full", epochs=4, learning_rate=1e-2, batch_size=4, patience=4)
    finetune(str(untaught), folder / "chat.jsonl", folder / "taught", settings)
    return folder / "taught"


def answers(teacher: Path, folder: Path, top_k: int) -> Path:
    prompts = folder / "prompts.jsonl"
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = GenerateSettings(max_new_tokens=12, batch_size=8, keep_truncated=True, top_k_logprobs=top_k)
    generate(str(teacher), prompts, folder / "data", settings)
    return folder / "data"


def test_gjsd_is_forward_kl_reverse_kl_and_zero_between_equals() -> None:
    import torch

    p = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.0]]), -1)
    forward = float((p.exp() * (p - q)).sum())
    reverse = float((q.exp() * (q - p)).sum())
    assert float(gjsd(q, p, 0.0)) == pytest.approx(forward)  # student q, teacher p: KL(teacher ‖ student)
    assert float(gjsd(q, p, 1.0)) == pytest.approx(reverse)
    assert float(gjsd(p, p, 0.5)) == pytest.approx(0.0, abs=1e-7)
    assert float(gjsd(q, p, 0.5)) == pytest.approx(float(gjsd(p, q, 0.5)))  # the JSD is symmetric
    assert 0 < float(gjsd(q, p, 0.5)) <= math.log(2)


def test_a_fresh_student_learns_the_stored_distribution_and_agrees_more(teacher: Path, tmp_path: Path) -> None:
    from slmops.build import models

    data = answers(teacher, tmp_path, top_k=8)
    fresh = models.make_tiny(tmp_path / "fresh", layers=2, seed=9)  # the teacher's tokenizer, nothing learned
    settings = DistillSettings(epochs=3, learning_rate=1e-2, batch_size=4, patience=3, validation_share=0.25)
    steps: list[int] = []
    record = distill(str(teacher), data, tmp_path / "student", settings, student=str(fresh),
                     on_step=lambda s, _t, _f: steps.append(s))  # fmt: skip
    assert record["teacher_distribution"] == "stored"
    losses = [e["validation_loss"] for e in record["epochs"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] * 0.8, losses
    assert record["agreement"]["after"] > record["agreement"]["before"], record["agreement"]
    assert (tmp_path / "student" / "model.safetensors").is_file() and steps[-1] == record["steps"]


def test_a_layer_subset_student_heals_from_a_live_teacher(teacher: Path, tmp_path: Path) -> None:
    data = answers(teacher, tmp_path, top_k=0)
    settings = DistillSettings(epochs=2, learning_rate=2e-3, batch_size=4, patience=2, beta=0.5, validation_share=0.25)
    record = distill(str(teacher), data, tmp_path / "student", settings, keep_layers=3)
    assert record["teacher_distribution"] == "live"
    assert record["student"]["made_from_teacher"]["layers"][:2] == [0, 1] and record["parameters"] > 0
    losses = [e["validation_loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0], losses
    assert record["agreement"]["after"] >= record["agreement"]["before"], record["agreement"]
    with pytest.raises(BuildError, match="give the student"):
        distill(str(teacher), data, tmp_path / "none", settings)
    with pytest.raises(ChatDataError, match="top_logprobs"):
        distill(str(teacher), data, tmp_path / "x", DistillSettings(teacher_distribution="stored"), keep_layers=3)


def test_the_cli_distils_and_shows_the_agreement(teacher: Path, tmp_path: Path) -> None:
    import subprocess

    from support import SLMOPS

    data = answers(teacher, tmp_path, top_k=4)
    command = [*SLMOPS, "build", "distill", "train", "--teacher", str(teacher), "--data", str(data)]
    done = subprocess.run([*command, "-o", str(tmp_path / "s"), "--layers", "0,1,5", "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "agreement with the teacher" in done.stdout and (tmp_path / "s" / "distill.json").is_file()
    bad = subprocess.run([*command, "-o", str(tmp_path / "b"), "--layers", "0,x"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 2


def test_on_policy_distillation_learns_over_the_students_own_answers(teacher: Path, tmp_path: Path) -> None:
    data = answers(teacher, tmp_path, top_k=4)  # stored top-k is there, and on-policy takes the live teacher
    settings = DistillSettings(alpha=1, beta=0.5, on_policy=0.5, on_policy_new_tokens=12, epochs=3,
                               learning_rate=2e-3, batch_size=4, patience=3, validation_share=0.25)  # fmt: skip
    record = distill(str(teacher), data, tmp_path / "student", settings, keep_layers=3)
    assert record["teacher_distribution"] == "live"
    batches = record["steps"]  # one batch per optimizer step here
    assert 0 < record["on_policy_batches"] < batches, record  # λ = 0.5: some batches on its own answers, not all
    losses = [e["validation_loss"] for e in record["epochs"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] * 0.8, losses
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_on_policy_without_its_own_answers_is_the_off_policy_loss(teacher: Path, tmp_path: Path) -> None:
    """TRL's trainer, set to our loss: where it draws no on-policy batch (λ near 0, seeded) it computes what
    our own trainer does with the live teacher at α = 1, temperature and T² included."""
    data = answers(teacher, tmp_path, top_k=0)
    common = {"alpha": 1, "beta": 0.5, "temperature": 2.0, "epochs": 1, "learning_rate": 2e-3, "batch_size": 4,
              "validation_share": 0.25}  # fmt: skip
    ours = distill(str(teacher), data, tmp_path / "ours", DistillSettings(**common), layers=[0, 1, 5])
    trl = distill(str(teacher), data, tmp_path / "trl", DistillSettings(**common, on_policy=1e-4), layers=[0, 1, 5])
    assert trl["on_policy_batches"] == 0
    for a, b in zip(ours["epochs"], trl["epochs"], strict=True):
        assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_on_policy_settings_that_cannot_take_effect_are_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set alpha to 1"):
        DistillSettings(on_policy=0.5)  # α = 0.5 would weigh a cross-entropy on the student's own answers
    with pytest.raises(ValidationError, match="live teacher"):
        DistillSettings(on_policy=0.5, alpha=1, teacher_distribution="stored")


def test_on_policy_without_trl_says_what_to_install(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)  # an import of it raises ImportError
    with pytest.raises(BuildError, match=r"slmops\[trl\]"):
        distill(str(teacher), tmp_path, tmp_path / "s", DistillSettings(alpha=1, on_policy=1), keep_layers=3)
    assert not (tmp_path / "s").exists()
