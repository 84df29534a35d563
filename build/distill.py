"""Distillation, stage 2: a student learns the teacher's answers and, where their tokenizers match, the
teacher's distribution over every answer token.

    loss = (1 − α) · CE(student, the teacher's answer tokens)
         + α · T² · GJSD_β(teacher_T ‖ student_T) over the answer tokens
        GJSD_β (TRL's generalized Jensen-Shannon divergence): β = 0 forward KL(teacher ‖ student),
        β = 1 reverse KL(student ‖ teacher), between: the JSD around the β-mixture. T softens both.
    the teacher's distribution: stored (answers.jsonl from `distill generate --top-k-logprobs K`: the
        K most likely tokens per answer token, the teacher's renormalised over them against the student's
        probabilities of those tokens out of its whole vocabulary, so that mass elsewhere costs), or live
        (the teacher run on every batch, the whole vocabulary)
    the student: a folder (any model with the teacher's tokenizer), or made from the teacher's layers
        (build/student: --keep-layers N by block influence on the training conversations, or --layers)
    on-policy (--on-policy λ, the extra slmops[trl]): on a share λ of the batches the student answers the
        prompts itself (sampled) and learns the live teacher's distribution over its own answer, as in
        GKD (Agarwal et al.) through TRL's GKDTrainer; the other batches learn it over the teacher's
        answers. The student's own answers are no target, so the loss is the divergence alone (α = 1).

Training is build/training's loop (validation each epoch, best epoch kept, early stopping,
checkpoints, --resume, DDP under torchrun). OUT/ holds the student, its tokenizer and distill.json:
the settings, the teacher's and the data's digests, how the student was made, the losses per epoch,
and the student's agreement with the teacher (the share of answer tokens where its most likely token is
the teacher's) before and after.
"""

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops.build.chat_data import ChatDataError, Conversation, file_digest, read_chat, tokenize
from slmops.build.training import OnStep, TrainingSettings, epochs_record, make_trainer, resume_point, split, versions
from slmops.errors import BuildError

PROVENANCE = "distill.json"
INIT = "student-init"
IGNORE = -100


class DistillSettings(TrainingSettings):
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the teacher's distribution against its answer tokens (0: the answers alone)."""
    beta: float = Field(default=0.0, ge=0, le=1)
    """GJSD's mixture: 0 forward KL, 1 reverse KL."""
    temperature: float = Field(default=2.0, gt=0, le=20)
    teacher_distribution: Literal["auto", "stored", "live"] = "auto"
    """auto: stored where the data has it, else live."""
    on_policy: float = Field(default=0.0, ge=0, le=1)
    """Share of batches on which the student answers the prompts itself (GKD's λ; needs slmops[trl])."""
    on_policy_new_tokens: int = Field(default=128, ge=1)
    """How long the student's own answers may grow on those batches."""

    @model_validator(mode="after")
    def _on_policy_learns_the_distribution(self) -> "DistillSettings":
        if self.on_policy > 0 and self.alpha != 1:
            raise ValueError("on-policy distillation learns the teacher's distribution alone (the student's own "
                             "answers are no target): set alpha to 1")  # fmt: skip
        if self.on_policy > 0 and self.teacher_distribution == "stored":
            raise ValueError("on-policy distillation needs the live teacher: its distribution over the student's "
                             "own answers cannot have been stored")  # fmt: skip
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or 5e-5


def gjsd(student_logp: Any, teacher_logp: Any, beta: float) -> Any:
    """Generalized JSD per token (rows), from log-probabilities over the same support; summed over it."""
    import math

    import torch

    def kl(p_log: Any, q_log: Any) -> Any:  # KL(p ‖ q)
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    if beta == 0:
        return kl(teacher_logp, student_logp)
    if beta == 1:
        return kl(student_logp, teacher_logp)
    mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0)
    return beta * kl(teacher_logp, mixture) + (1 - beta) * kl(student_logp, mixture)


def distill(
    teacher: str,
    data: Path,
    out: Path,
    settings: DistillSettings,
    student: str | None = None,
    keep_layers: int | None = None,
    layers: list[int] | None = None,
    validation: Path | None = None,
    resume: bool = False,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Train the student and write OUT (see the module's docstring); returns the record."""
    on_policy = _on_policy_trainer() if settings.on_policy > 0 else None  # TRL missing: said before any work
    answers = data / "answers.jsonl" if data.is_dir() else data
    items = _items(answers)
    held_out = _items(validation) if validation else None
    if (student is None) == (keep_layers is None and layers is None):
        raise BuildError("give the student: a model folder (--student), or --keep-layers N or --layers of the teacher")
    last = resume_point(out, resume)

    from slmops.build import models
    from slmops.build import student as students

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_path = models.resolve(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    origin: dict[str, Any]
    if student is None:
        init = out / INIT
        if int(os.environ.get("RANK", "0")) > 0:  # under torchrun or Ray Train the first process makes it
            made = _wait_for_json(init / students.RECORD)
        elif resume and (init / students.RECORD).is_file():
            made = json.loads((init / students.RECORD).read_text())
        else:
            made = students.make_student(
                teacher, init, keep_layers, layers, [_render(tokenizer, c) for c, _ in items[:256]]
            )
        student_path, origin = init, {"made_from_teacher": made}
    else:
        student_path, origin = models.resolve(student), {"model": student}
        origin["digest"] = models.weights_digest(student_path)
    student_tokenizer = AutoTokenizer.from_pretrained(student_path)
    if settings.alpha > 0 and student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise BuildError(
            "the student's tokenizer is not the teacher's: the teacher's distribution cannot be learned; "
            "train on its answers alone (--alpha 0)"
        )

    stored = all(extra.get("top_logprobs") for _, extra in items)
    if settings.teacher_distribution == "stored" and not stored:
        raise ChatDataError(
            f"{answers}: not every answer has the teacher's top_logprobs (distill generate --top-k-logprobs)"
        )
    use_stored = stored and settings.teacher_distribution != "live" and settings.on_policy == 0
    if use_stored and held_out is not None and not all(extra.get("top_logprobs") for _, extra in held_out):
        raise ChatDataError(
            f"{validation}: the teacher's distribution is stored for the training answers but not for these: "
            "validate on answers `distill generate` made too, or on a share of the data (no validation file)"
        )
    train_items, validation_items = split(items, held_out, settings)
    train_features = [_features(tokenizer, c, extra, settings.max_length, use_stored) for c, extra in train_items]
    validation_features = [
        _features(tokenizer, c, extra, settings.max_length, use_stored) for c, extra in validation_items
    ]

    torch.manual_seed(settings.seed)
    network = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    live = None  # the teacher run on every batch (and for the agreement) unless its distribution is stored
    if not use_stored:
        live = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
        live.requires_grad_(False)
    before = agreement(network, validation_features, live)
    if on_policy is not None:
        from datasets import Dataset  # with TRL, in slmops[trl]

        config_class, trainer_class = on_policy
        chats = [Dataset.from_list([{"messages": [t.model_dump() for t in c.messages]} for c, _ in part])
                 for part in (train_items, validation_items)]  # fmt: skip
        gkd = {"lmbda": settings.on_policy, "beta": settings.beta, "max_new_tokens": settings.on_policy_new_tokens,
               "temperature": 1.0, "max_length": settings.max_length, "seq_kd": False, "bf16": False,
               "gradient_checkpointing": False}  # fmt: skip
        # the student samples its own distribution (T = 1); the divergence takes the settings' temperature
        trainer = make_trainer(
            network, tokenizer, chats[0], chats[1], out, settings, settings.lr, None, on_step,
            trainer_class=trainer_class, arguments_class=config_class, more_arguments=gkd, teacher_model=live,
            distill_settings=settings,
        )  # fmt: skip
    else:
        trainer = make_trainer(
            network, tokenizer, train_features, validation_features, out, settings, settings.lr,
            _Collator(tokenizer.pad_token_id), on_step, trainer_class=_distill_trainer(),
            teacher=live if settings.alpha > 0 and not use_stored else None, distill_settings=settings,
        )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    if not trainer.is_world_process_zero():
        return {}
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "settings": settings.model_dump(mode="json"),
        "teacher": {"model": teacher, "path": str(teacher_path), "digest": models.weights_digest(teacher_path)},
        "student": origin,
        "teacher_distribution": "none" if settings.alpha == 0 else "stored" if use_stored else "live",
        "data": {"path": str(answers), "sha256": file_digest(answers), "conversations": len(items)},
        "validation": {"path": str(validation), "sha256": file_digest(validation)} if validation else None,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        **epochs_record(trainer, settings),
        "agreement": {"before": before, "after": agreement(trainer.model, validation_features, live)},
        **({"on_policy_batches": trainer.on_policy_batches} if settings.on_policy > 0 else {}),
        "versions": versions(),
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def agreement(model: Any, features: list[dict[str, Any]], teacher: Any | None) -> float:
    """The share of answer tokens where the student's most likely token is the teacher's (stored top-1,
    or the live teacher's)."""
    import torch

    model.eval()
    same = total = 0
    with torch.no_grad():
        for feature in features:
            ids = torch.tensor([feature["input_ids"]])
            labels = torch.tensor(feature["labels"])[1:]
            mask = labels != IGNORE
            mine = model(ids).logits[0, :-1][mask].argmax(-1)
            if "kd_ids" in feature:
                theirs = torch.tensor(feature["kd_ids"])[1:][mask][:, 0]
            else:
                assert teacher is not None
                theirs = teacher(ids).logits[0, :-1][mask].argmax(-1)
            same += int((mine == theirs).sum())
            total += int(mask.sum())
    model.train()
    return same / total if total else 0.0


# --- data -----------------------------------------------------------------------------------------


def _items(path: Path) -> list[tuple[Conversation, dict[str, Any]]]:
    return [(c, dict(c.model_extra or {})) for c in read_chat(path)]


def _wait_for_json(path: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """The JSON another process writes last when it is done (the student's record), once it is there."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise BuildError(f"{path} did not appear in {timeout_s:.0f} s: did the first process fail?")
        time.sleep(0.5)
    return json.loads(path.read_text())


def _render(tokenizer: Any, conversation: Conversation) -> str:
    return str(tokenizer.apply_chat_template([t.model_dump() for t in conversation.messages], tokenize=False))


def _features(
    tokenizer: Any, conversation: Conversation, extra: dict[str, Any], max_length: int, stored: bool
) -> dict[str, Any]:
    """Token ids and labels (answers only); with the stored distribution, the prompt's ids then the very
    tokens the teacher generated, and at each of their positions its top-k ids and log-probabilities."""
    if not stored:
        return tokenize(tokenizer, conversation, max_length).as_features()
    messages = [t.model_dump() for t in conversation.messages[:-1]]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = extra["answer_ids"]
    top = extra["top_logprobs"]
    if len(top) != len(answer):
        raise ChatDataError(f"{extra.get('id')}: {len(top)} top_logprobs rows for {len(answer)} answer tokens")
    k = len(top[0])
    ids = (prompt_ids + answer)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer)[:max_length]
    kd_ids = ([[0] * k] * len(prompt_ids) + [[int(i) for i, _ in row] for row in top])[:max_length]
    kd_logprobs = ([[0.0] * k] * len(prompt_ids) + [[float(v) for _, v in row] for row in top])[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "kd_ids": kd_ids,
            "kd_logprobs": kd_logprobs}  # fmt: skip


class _Collator:
    """Right-pads a batch: ids with the pad token, labels with IGNORE, the stored distribution with zeros."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE}
        batch = {
            key: torch.tensor([f[key] + [value] * (length - len(f[key])) for f in features])
            for key, value in fill.items()
        }
        if "kd_ids" in features[0]:
            k = len(features[0]["kd_ids"][0])
            batch["kd_ids"] = torch.tensor([f["kd_ids"] + [[0] * k] * (length - len(f["kd_ids"])) for f in features])
            batch["kd_logprobs"] = torch.tensor(
                [f["kd_logprobs"] + [[0.0] * k] * (length - len(f["kd_logprobs"])) for f in features]
            )
        return batch


def _distill_trainer() -> type:
    """transformers' Trainer with the distillation loss (imported late: the CLI loads without torch)."""
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args: Any, teacher: Any, distill_settings: DistillSettings, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher, self.distill_settings = teacher, distill_settings
            if teacher is not None:
                teacher.to(self.args.device)

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            s = self.distill_settings
            kd_ids, kd_logprobs = inputs.pop("kd_ids", None), inputs.pop("kd_logprobs", None)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1]
            target = labels[:, 1:]
            mask = target != IGNORE
            chosen = logits[mask]
            loss = torch.nn.functional.cross_entropy(chosen, target[mask])
            if s.alpha > 0:
                t = s.temperature
                if kd_ids is not None:
                    ids = kd_ids[:, 1:][mask]
                    # the student's own probabilities of those K tokens (of its whole vocabulary: mass it puts
                    # elsewhere is a loss), against the teacher's renormalised over them
                    student = torch.log_softmax(chosen / t, -1).gather(-1, ids)
                    teacher = kd_logprobs[:, 1:][mask] / t
                    teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True)
                else:
                    with torch.no_grad():
                        teacher_logits = self.teacher(**inputs).logits[:, :-1][mask]
                    student = torch.log_softmax(chosen / t, -1)
                    teacher = torch.log_softmax(teacher_logits / t, -1)
                divergence = gjsd(student, teacher, s.beta).mean() * t * t
                loss = (1 - s.alpha) * loss + s.alpha * divergence
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def _on_policy_trainer() -> tuple[type, type]:
    """TRL's GKD config and trainer, set to our loss (imported late: TRL is the extra slmops[trl])."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL keeps GKD under trl.experimental and warns so on import
            from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        raise BuildError(f"on-policy distillation needs TRL: pip install 'slmops[trl]' ({e})") from e

    class OnPolicyTrainer(GKDTrainer):
        def __init__(self, *args: Any, distill_settings: DistillSettings, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.distill_settings, self.on_policy_batches = distill_settings, 0
            # TRL 1.16 divides a batch's summed divergence by the token count of the data's answers, also on a
            # batch where the student's own answer (of another length) replaced them; without that count it
            # takes each batch's mean
            self.model_accepts_loss_kwargs = False

        # TRL's two are static methods; these read the instance (a count, the settings) and TRL calls them on it
        def generate_on_policy_outputs(self, model: Any, inputs: Any, generation_config: Any) -> Any:  # type: ignore[override]
            self.on_policy_batches += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        def generalized_jsd_loss(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            t = self.distill_settings.temperature  # softened and T²-scaled like the off-policy loss
            return GKDTrainer.generalized_jsd_loss(*args, **{**kwargs, "temperature": t}) * t * t

    return GKDConfig, OnPolicyTrainer
