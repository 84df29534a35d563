"""A student made of some of the teacher's layers (Minitron, ShortGPT): fewer layers, the teacher's
weights, healed afterwards by distillation.

    block influence of layer i = 1 − mean cos(h_in, h_out) over the tokens of calibration text: how
        much the layer changes what flows through it (ShortGPT's Block Influence). The layers that
        change it least go first.
    choose_layers(influence, keep): the first two and the last are always kept (removing them ruins a
        small model); the rest by influence, in their original order.
    layer_subset(teacher, layers, out): the teacher with only those layers; `self_attn.layer_idx`,
        `config.num_hidden_layers` and `config.layer_types` re-indexed; saved with the tokenizer and
        student.json (which layers, the influences, the teacher's digest).

At CPU scale remove at most a quarter to a third of the layers: a student of 10 of SmolLM2's 30 starts
near a fresh initialisation (perplexity in the millions) and distillation cannot heal it on a CPU budget.
"""

import json
from pathlib import Path
from typing import Any

from slmops.errors import BuildError
from slmops.paths import replace_file

RECORD = "student.json"
ALWAYS_FIRST, ALWAYS_LAST = 2, 1


def block_influence(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256) -> list[float]:
    """Per layer, 1 − the mean cosine similarity of its input and output hidden states over `texts`."""
    import torch

    layers = model.config.num_hidden_layers
    totals, tokens = [0.0] * layers, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length, add_special_tokens=False)
            states = model(**ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
            for index in range(layers):
                cosine = torch.nn.functional.cosine_similarity(states[index][0], states[index + 1][0], dim=-1)
                totals[index] += float((1 - cosine).sum())
            tokens += ids["input_ids"].shape[1]
    if not tokens:
        raise BuildError("no calibration tokens: block influence needs some text")
    return [total / tokens for total in totals]


def choose_layers(influence: list[float], keep: int) -> list[int]:
    """The `keep` layers to keep: the first two, the last, and the most influential of the rest."""
    count = len(influence)
    fixed = {*range(min(ALWAYS_FIRST, count)), count - 1}
    if not len(fixed) <= keep <= count:
        raise BuildError(f"keep {keep} of {count} layers: at least {len(fixed)} (the first two and the last)")
    rest = sorted((i for i in range(count) if i not in fixed), key=lambda i: influence[i], reverse=True)
    return sorted(fixed | set(rest[: keep - len(fixed)]))


def layer_subset(model: Any, layers: list[int]) -> Any:
    """`model` (a Llama-like transformers model) with only `layers`, re-indexed in place."""
    import torch

    count = model.config.num_hidden_layers
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= count:
        raise BuildError(f"layers {layers}: distinct layer numbers in 0..{count - 1}, in order")
    kept = torch.nn.ModuleList([model.model.layers[i] for i in layers])
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index  # type: ignore[union-attr]  # a decoder layer's attention
    model.model.layers = kept
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def make_student(
    teacher: str,
    out: Path,
    keep: int | None = None,
    layers: list[int] | None = None,
    calibration: list[str] | None = None,
) -> dict[str, Any]:
    """Write a layer-subset student of `teacher` to OUT: `layers` as given, or the `keep` most influential
    (measured on `calibration` texts). Returns the record written to student.json."""
    from slmops.build import models

    models.quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (keep is None) == (layers is None):
        raise BuildError("give the number of layers to keep or the list of layers, one of them")
    source = models.resolve(teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    influence = None
    if keep is not None:
        if not calibration:
            raise BuildError("choosing layers by influence needs calibration text (the training conversations)")
        influence = block_influence(model, tokenizer, calibration)
        layers = choose_layers(influence, keep)
    assert layers is not None
    teacher_layers = model.config.num_hidden_layers
    layer_subset(model, layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "teacher": {"model": teacher, "path": str(source), "digest": models.weights_digest(source)},
        "teacher_layers": teacher_layers,
        "layers": layers,
        "influence": influence,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    replace_file(out / RECORD, (json.dumps(record, indent=2) + "\n").encode())  # last and whole: it says done
    return record
