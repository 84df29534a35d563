"""Fine-tuning a causal language model on chat data: LoRA (peft) or every weight, on a CPU or a GPU.

    MODEL (resolve: catalogue, folder, .gguf) + chat.jsonl (build/chat_data: answers only are learned)
        ─► validation: --validation FILE, or a seeded share of the data held out
        ─► build/training: transformers' Trainer (validation each epoch, the best epoch kept, early
           stopping, a checkpoint per epoch under OUT/checkpoints, --resume from the last)
    OUT/  adapter_config.json + adapter_model.safetensors (LoRA), or the whole model (--method full, or
          LoRA with --merge: merged into the base); the tokenizer; finetune.json (provenance: the settings,
          the base model's and the data's digests, the losses per epoch, where it stopped and why)

QLoRA (the base in 4 bits) needs bitsandbytes and a CUDA GPU; without them it is refused before any work.
Several processes (torchrun --nproc_per_node N) split the batches (DDP): the Trainer reads torchrun's
environment.
"""

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops.build.chat_data import ChatDataError, file_digest, read_chat, tokenize
from slmops.build.training import OnStep, TrainingSettings, epochs_record, make_trainer, resume_point, split, versions
from slmops.errors import ConfigError

PROVENANCE = "finetune.json"
ALL_LINEAR = "all-linear"


class FinetuneSettings(TrainingSettings):
    """Everything that decides the result (it goes into finetune.json as it is)."""

    method: Literal["lora", "full"] = "lora"
    qlora: bool = False
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: [ALL_LINEAR])
    """Module names LoRA adapts (q_proj, v_proj...), or all-linear: every linear layer but the output head."""
    merge: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> "FinetuneSettings":
        if self.method == "full" and (self.qlora or self.merge):
            raise ValueError("--qlora and --merge are LoRA's: with --method full every weight is trained")
        return self

    @property
    def lr(self) -> float:
        """learning_rate, or by default 2e-4 for LoRA, 2e-5 for every weight."""
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)


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
    train_set, validation_set = split(conversations, held_out, settings)

    from slmops.build import models

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    base = models.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_features = [tokenize(tokenizer, c, settings.max_length).as_features() for c in train_set]
    validation_features = [tokenize(tokenizer, c, settings.max_length).as_features() for c in validation_set]
    if not any(label != -100 for f in train_features for label in f["labels"]):
        raise ChatDataError(f"{data}: every answer falls past max_length {settings.max_length}: nothing to learn")
    last = resume_point(out, resume)

    torch.manual_seed(settings.seed)
    network = _adapted(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), settings)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = make_trainer(
        network, tokenizer, train_features, validation_features, out, settings, settings.lr, collator, on_step
    )
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    if not trainer.is_world_process_zero():
        return {}
    model_out = trainer.model.merge_and_unload() if settings.method == "lora" and settings.merge else trainer.model
    model_out.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "settings": settings.model_dump(mode="json"),
        "output": "adapter" if settings.method == "lora" and not settings.merge else "model",
        "base": {"path": str(base), "digest": models.weights_digest(base)},
        "data": {"path": str(data), "sha256": file_digest(data)},
        "validation": {"path": str(validation), "sha256": file_digest(validation)} if validation else None,
        "trainable_parameters": trainable,
        **epochs_record(trainer, settings),
        "versions": versions(),
    }
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
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
