"""What fine-tuning (build/finetune.py) and distillation (build/distill.py) share: the training settings,
the split into training and validation, and transformers' Trainer set up one way.

    Trainer: AdamW, linear schedule with warm-up, gradient accumulation, clipping at 1.0; the validation
    loss after every epoch, the best epoch's weights kept (load_best_model_at_end), early stopping after
    `patience` epochs without a better one, a checkpoint per epoch under OUT/checkpoints (resume: the
    last), progress to a callback instead of print(). On a GPU when there is one; under torchrun the
    Trainer runs DDP over the processes (each sets OMP_NUM_THREADS=1 on a CPU).
"""

import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from slmops.build.chat_data import ChatDataError
from slmops.errors import BuildError

CHECKPOINTS = "checkpoints"

OnStep = Callable[[int, int, dict[str, float]], None]
"""What a caller shows while training runs: called with (step, total steps, the figures just logged)."""

T = TypeVar("T")


class TrainingSettings(BaseModel):
    """The loop's settings, for every kind of training (what decides the result goes into its record)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=3, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0)
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
    seed: int = 0


def split(items: Sequence[T], held_out: Sequence[T] | None, settings: TrainingSettings) -> tuple[list[T], list[T]]:
    """Training and validation items: `held_out` when given, else a seeded share of `items`."""
    if held_out is not None:
        return list(items), list(held_out)
    if len(items) < 2:
        raise ChatDataError("one conversation cannot be split into training and validation: give a validation file")
    order = list(range(len(items)))
    random.Random(settings.seed).shuffle(order)
    cut = max(1, math.floor(len(items) * settings.validation_share))
    return [items[i] for i in order[cut:]], [items[i] for i in order[:cut]]


def resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint to go on from (resume), after checking that OUT may be written. Of several processes
    (torchrun, Ray Train) the first checks: the others may come here after it has begun to write OUT."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = out / CHECKPOINTS
    if resume:
        found = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if not found:
            raise BuildError(f"nothing to resume: {checkpoints} holds no checkpoint")
        return Path(found)
    if int(os.environ.get("RANK", "0")) == 0 and out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty: choose another folder, or --resume a run stopped there")
    return None


def make_trainer(
    network: Any,
    tokenizer: Any,
    train_features: Sequence[dict[str, Any]],
    validation_features: Sequence[dict[str, Any]],
    out: Path,
    settings: TrainingSettings,
    learning_rate: float,
    collator: Any,
    on_step: OnStep | None,
    trainer_class: type | None = None,
    arguments_class: type | None = None,
    more_arguments: dict[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """transformers' Trainer (or `trainer_class`, a subclass, given `extra`) set up as the module says;
    its arguments are TrainingArguments (or `arguments_class`, a subclass, given `more_arguments`)."""
    import torch
    from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    arguments = (arguments_class or TrainingArguments)(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=settings.epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        eval_strategy="epoch",
        prediction_loss_only=True,  # the validation loss only: no logits gathered (vocab × tokens × items)
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
        ddp_find_unused_parameters=False,  # every trainable weight takes part (DDP skips a graph traversal)
        **(more_arguments or {}),
    )

    class Reporting(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            if on_step is not None and state.is_world_process_zero:
                on_step(state.global_step, state.max_steps, dict(logs or {}))

    trainer = (trainer_class or Trainer)(
        model=network,
        args=arguments,
        train_dataset=train_features,
        eval_dataset=validation_features,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[Reporting(), EarlyStoppingCallback(early_stopping_patience=settings.patience)],
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to `on_step`, not print()
    return trainer


def epochs_record(trainer: Any, settings: TrainingSettings) -> dict[str, Any]:
    """Per epoch the mean training loss and the validation loss; the best epoch; whether it stopped early."""
    history = trainer.state.log_history
    epochs = []
    for entry in history:
        if "eval_loss" in entry:
            epoch = round(entry["epoch"])
            losses = [h["loss"] for h in history if "loss" in h and math.ceil(h["epoch"] - 1e-6) == epoch]
            train = sum(losses) / len(losses) if losses else None
            epochs.append({"epoch": epoch, "validation_loss": entry["eval_loss"], "train_loss": train})
    best = min(epochs, key=lambda e: e["validation_loss"])
    return {
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "stopped_early": len(epochs) < settings.epochs,
        "steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
    }


def versions() -> dict[str, str]:
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        pass
    return found
