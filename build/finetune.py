"""Fine-tuning a causal language model on chat data: LoRA (peft) or every weight, on a CPU or a GPU.

    MODEL (resolve: catalogue, folder, .gguf) + chat.jsonl (build/chat_data: answers only are learned)
        ─► validation: --validation FILE, or a seeded share of the data held out
        ─► transformers' Trainer: AdamW, linear schedule with warm-up, gradient accumulation, clipping;
           the validation loss after every epoch; the best epoch kept; early stopping after `patience`
           epochs without a better one; a checkpoint per epoch under OUT/checkpoints (resume: the last)
    OUT/  adapter_config.json + adapter_model.safetensors (LoRA), or the whole model (--method full, or
          LoRA with --merge: merged into the base); the tokenizer; finetune.json (provenance: the settings,
          the base model's and the data's digests, the losses per epoch, where it stopped and why)

QLoRA (the base in 4 bits) needs bitsandbytes and a CUDA GPU; without them it is refused before any work.
Several processes (torchrun --nproc_per_node N) split the batches (DDP): the Trainer reads torchrun's
environment.
"""

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.build.chat_data import ChatDataError, Conversation, file_digest, read_chat, tokenize
from slmops.errors import BuildError, ConfigError

PROVENANCE = "finetune.json"
CHECKPOINTS = "checkpoints"
ALL_LINEAR = "all-linear"


class FinetuneSettings(BaseModel):
    """Everything that decides the result (it goes into finetune.json as it is)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full"] = "lora"
    qlora: bool = False
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = [ALL_LINEAR]
    """Module names LoRA adapts (q_proj, v_proj...), or all-linear: every linear layer but the output head."""
    epochs: int = Field(default=3, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0)
    """Default: 2e-4 for LoRA, 2e-5 for every weight."""
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=8)
    warmup: float = Field(default=0.05, ge=0, lt=1)
    """Share of the steps the learning rate warms up over."""
    weight_decay: float = Field(default=0.0, ge=0)
    patience: int = Field(default=2, ge=1)
    """Epochs without a better validation loss before training stops."""
    validation_share: float = Field(default=0.1, gt=0, lt=1)
    """Held out of the data when no validation file is given."""
    merge: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _coherent(self) -> "FinetuneSettings":
        if self.method == "full" and (self.qlora or self.merge):
            raise ValueError("--qlora and --merge are LoRA's: with --method full every weight is trained")
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)


OnStep = Callable[[int, int, dict[str, float]], None]
"""What a caller shows while training runs: called with (step, total steps, the figures just logged)."""


def finetune(
    model: str,
    data: Path,
    out: Path,
    settings: FinetuneSettings,
    validation: Path | None = None,
    resume: bool = False,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Train and write OUT (see the module's docstring); returns the provenance record."""
    if settings.qlora:
        _check_qlora()
    conversations = read_chat(data)
    held_out = read_chat(validation) if validation else None
    train_set, validation_set = _split(conversations, held_out, settings)

    from slmops.build import models

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    base = models.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_features = [tokenize(tokenizer, c, settings.max_length).as_features() for c in train_set]
    validation_features = [tokenize(tokenizer, c, settings.max_length).as_features() for c in validation_set]
    if not any(label != -100 for f in train_features for label in f["labels"]):
        raise ChatDataError(f"{data}: every answer falls past max_length {settings.max_length}: nothing to learn")

    checkpoints = out / CHECKPOINTS
    last = _last_checkpoint(checkpoints) if resume else None
    if resume and last is None:
        raise BuildError(f"nothing to resume: {checkpoints} holds no checkpoint")
    if not resume and out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty: choose another folder, or --resume a run stopped there")

    torch.manual_seed(settings.seed)
    network = _adapted(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), settings)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    trainer = _trainer(network, tokenizer, train_features, validation_features, checkpoints, settings, on_step)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=settings.patience))
    trainer.remove_callback(PrinterCallback)  # progress goes to `on_step`, not print()
    trainer.data_collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer.train(resume_from_checkpoint=str(last) if last else None)

    if trainer.is_world_process_zero():
        record = _write(trainer, tokenizer, out, settings, base, data, validation, trainable)
    else:
        record = {}
    return record


# --- pieces ----------------------------------------------------------------------------------------


def _check_qlora() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise ConfigError(
            "--qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU and the bitsandbytes "
            "package: train with plain LoRA (no --qlora) here"
        )


def _split(
    conversations: list[Conversation], held_out: list[Conversation] | None, settings: FinetuneSettings
) -> tuple[list[Conversation], list[Conversation]]:
    if held_out is not None:
        return conversations, held_out
    if len(conversations) < 2:
        raise ChatDataError("one conversation cannot be split into training and validation: give --validation")
    order = list(range(len(conversations)))
    random.Random(settings.seed).shuffle(order)
    cut = max(1, math.floor(len(conversations) * settings.validation_share))
    return [conversations[i] for i in order[cut:]], [conversations[i] for i in order[:cut]]


def _adapted(network: Any, settings: FinetuneSettings) -> Any:
    """The model to train: `network` itself (every weight), or wrapped by peft with LoRA adapters."""
    if settings.method == "full":
        return network
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = ALL_LINEAR if settings.target_modules == [ALL_LINEAR] else settings.target_modules
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(network, config)


def _trainer(
    network: Any,
    tokenizer: Any,
    train_features: list[dict[str, list[int]]],
    validation_features: list[dict[str, list[int]]],
    checkpoints: Path,
    settings: FinetuneSettings,
    on_step: OnStep | None,
) -> Any:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_total_limit=settings.patience + 1,  # the best is kept besides
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )

    class Reporting(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            if on_step is not None and state.is_world_process_zero:
                on_step(state.global_step, state.max_steps, dict(logs or {}))

    return Trainer(
        model=network,
        args=arguments,
        train_dataset=train_features,
        eval_dataset=validation_features,
        processing_class=tokenizer,
        callbacks=[Reporting()],
    )


def _last_checkpoint(checkpoints: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(found) if checkpoints.is_dir() and (found := get_last_checkpoint(str(checkpoints))) else None


def _write(
    trainer: Any,
    tokenizer: Any,
    out: Path,
    settings: FinetuneSettings,
    base: Path,
    data: Path,
    validation: Path | None,
    trainable: int,
) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from slmops.build import models

    model = trainer.model
    if settings.method == "lora" and settings.merge:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    history = trainer.state.log_history
    epochs = []
    for entry in history:
        if "eval_loss" in entry:
            epoch = round(entry["epoch"])
            losses = [h["loss"] for h in history if "loss" in h and math.ceil(h["epoch"] - 1e-6) == epoch]
            epochs.append({"epoch": epoch, "validation_loss": entry["eval_loss"], "train_loss": _mean(losses)})
    best = min(epochs, key=lambda e: e["validation_loss"])
    record = {
        "settings": settings.model_dump(mode="json"),
        "output": "adapter" if settings.method == "lora" and not settings.merge else "model",
        "base": {"path": str(base), "digest": models.weights_digest(base)},
        "data": {"path": str(data), "sha256": file_digest(data)},
        "validation": {"path": str(validation), "sha256": file_digest(validation)} if validation else None,
        "trainable_parameters": trainable,
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "stopped_early": len(epochs) < settings.epochs,
        "steps": trainer.state.global_step,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
