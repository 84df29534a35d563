"""`slmops build ...`: source models, export per target, evaluation with gates."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmops.build.executors import ExecutorName
from slmops.build.export import QUANT_METHODS, BuildRecord, FromGguf, QnnSoc, QuantMethod, missing_tools
from slmops.bundle import VARIANTS_DIR
from slmops.errors import GateFailed, SlmopsError
from slmops.terminal import console, err_console, fail

app = typer.Typer(
    help="The model pipeline: fetch a source model, export one variant per hardware target, evaluate.",
    no_args_is_help=True,
)
model_app = typer.Typer(help="Source checkpoints: materialize catalogue models offline, make tiny test models.")
app.add_typer(model_app, name="model")

GATE_FAILED_EXIT = 3


@model_app.command("fetch")
def fetch_cmd(
    name: Annotated[str, typer.Argument(help="Catalogue name, e.g. smollm2-135m-instruct.")],
    force: Annotated[bool, typer.Option(help="Rebuild the cached checkpoint.")] = False,
) -> None:
    """Materialize a catalogue model as a Hugging Face folder (cached under the slmops home)."""
    from slmops.build import models

    try:
        path = models.fetch(name, force=force, console=err_console)
    except SlmopsError as e:
        fail(str(e))
    console.print(str(path))


@model_app.command("list")
def list_cmd() -> None:
    """The catalogue, and which models are already materialized here."""
    from slmops import paths
    from slmops.build import models

    table = Table()
    for column in ("name", "materialized", "description"):
        table.add_column(column)
    for name, source in models.CATALOGUE.items():
        here = (paths.models_dir() / name / models.SOURCE_RECORD).is_file()
        table.add_row(name, str(paths.models_dir() / name) if here else "no", source.description)
    console.print(table)


@model_app.command("tiny")
def tiny_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    layers: Annotated[int, typer.Option(min=1)] = 2,
    hidden_size: Annotated[int, typer.Option(min=8)] = 64,
    seed: int = 0,
) -> None:
    """A random-initialized model of the reference architecture with the real tokenizer (for tests)."""
    from slmops.build import models

    try:
        console.print(str(models.make_tiny(out, layers=layers, hidden_size=hidden_size, seed=seed)))
    except SlmopsError as e:
        fail(str(e))


@app.command("targets")
def targets_cmd() -> None:
    """The hardware targets a variant can be built for."""
    from slmops.targets import TARGETS

    table = Table()
    for column in ("target", "provider", "class", "precision", "built by", "description"):
        table.add_column(column)
    for t in TARGETS.values():
        if missing_tools(t):
            built_by = f"[yellow]needs {t.requires}[/]"
        else:
            built_by = (
                "model builder" if t.builder_precision else "slmops (OpenVINO IR)" if t.openvino else "slmops (QNN)"
            )
        table.add_row(t.id, t.execution_provider, t.device_class, t.precision, built_by, t.description)
    console.print(table)
    methods = Table(title="--quant: int4 from float weights (a GGUF source's own blocks are carried instead)")
    for column in ("method", "what it does and costs"):
        methods.add_column(column)
    for name, cost in QUANT_METHODS.items():
        methods.add_row(name, cost)
    console.print(methods)


@app.command("export")
def export_cmd(
    model: Annotated[
        str, typer.Argument(help="Catalogue name, local .gguf file, local Hugging Face folder, or hub id.")
    ],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Target id; repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder to write.")],
    block_size: Annotated[int, typer.Option(help="int4/int8 quantization block size (16-256).")] = 32,
    accuracy_level: Annotated[
        int | None,
        typer.Option(help="int4 MatMul compute: 4=int8, 3=bf16, 2=fp16, 1=fp32 (default: 4 on CPU)."),
    ] = None,
    quant: Annotated[
        QuantMethod,
        typer.Option(
            help="How int4 weights are made from float ones (a GGUF source's own blocks are carried instead, "
            "see --from-gguf): " + "; ".join(f"{name}: {cost}" for name, cost in QUANT_METHODS.items())
        ),
    ] = "imatrix",
    from_gguf: Annotated[
        FromGguf,
        typer.Option(
            help="A model that comes as a GGUF (the catalogue's): exact carries its Q4_0/Q4_1/Q8_0 blocks into "
            "cpu-int4 bit for bit (no quality lost, Q4_1 costs one small extra MatMul per matrix); "
            "dequantize re-rounds the float weights (the builder's RTN int4: +29 % perplexity on SmolLM2)."
        ),
    ] = "exact",
    max_ppl_increase: Annotated[
        str,
        typer.Option(
            help="Accuracy gate: fail the build where a variant's perplexity on the held-out text is more than "
            "this above the float source's (e.g. 5%, 0.05); `off` records the figures without gating."
        ),
    ] = "5%",
    qnn_soc: Annotated[
        QnnSoc,
        typer.Option(help="The Snapdragon SoC qnn-npu's context binary is compiled for (SM8650 is 8 Gen 3)."),
    ] = "sm8650",
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FOLDER: a LoRA adapter (build finetune without --merge) every variant carries beside its "
            "base graph; requests pick it as model `BUNDLE:NAME`. Repeat for several."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty export folder.")] = False,
) -> None:
    """Build one variant per target into OUT/variants/<target>/.

    Every variant that runs here (CPU) is scored against the float source (perplexity on the held-out
    text); exit code 3 when one is worse than --max-ppl-increase allows.
    """
    from pydantic import ValidationError

    from slmops.build.evaluate import parse_fraction
    from slmops.build.export import QuantOptions, Recipe, export

    try:
        recipe = Recipe(
            source=model,
            targets=target,
            quant=QuantOptions(method=quant, block_size=block_size, accuracy_level=accuracy_level),
            from_gguf=from_gguf,
            qnn_soc=qnn_soc,
            adapters=_named_folders(adapter or []),
        )
        bound = None if max_ppl_increase.strip().lower() == "off" else parse_fraction(max_ppl_increase)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()), code=2)
    except ValueError as e:
        fail(f"--max-ppl-increase: {e} (or off)", code=2)
    try:
        record = export(recipe, out, force=force, console=err_console, max_ppl_increase=bound)
    except GateFailed as e:
        _print_export(BuildRecord.load(out), out)
        fail(str(e), code=GATE_FAILED_EXIT)
    except (SlmopsError, FileExistsError) as e:
        fail(str(e))
    _print_export(record, out)


def _named_folders(pairs: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            fail(f"--adapter {pair!r}: write NAME=FOLDER", code=2)
        if name in named:
            fail(f"--adapter {name} is given twice", code=2)
        named[name] = folder
    return named


def _print_export(record: BuildRecord, out: Path) -> None:
    reference = f"float source perplexity {record.reference.perplexity:.3f}" if record.reference else "no reference"
    table = Table(title=f"exported to {out} ({reference})")
    for column in ("target", "size MiB", "perplexity", "vs float", "gate", "seconds", "options"):
        table.add_column(column)
    for variant_id, v in record.variants.items():
        size = sum(p.stat().st_size for p in (out / VARIANTS_DIR / variant_id).rglob("*") if p.is_file())
        options = " ".join(f"{k}={v}" for k, v in v.build_options.items())
        if v.quant:
            options += f" quant={v.quant}"
        if v.blocks:
            options += " (" + ", ".join(f"{n} {kind}" for kind, n in v.blocks.items()) + ")"
        if v.adapters:
            options += " adapters=" + ",".join(a.name for a in v.adapters)
        a = v.accuracy
        if a is None:
            ppl, delta, gate = "–", "–", "[yellow]not run here[/]"
        else:
            ppl, delta = f"{a.perplexity:.3f}", f"{a.increase:+.2%}"
            gate = "off" if a.max_increase is None else ("[green]passed[/]" if a.passed else "[red]failed[/]")
        table.add_row(variant_id, f"{size / 2**20:.1f}", ppl, delta, gate, f"{v.seconds:.1f}", options)
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    variant: Annotated[Path, typer.Argument(help="A variant folder (e.g. OUT/variants/cpu-int4).", exists=True)],
    runs: Annotated[int, typer.Option(min=1, help="Timed decode runs (after one warm-up); the median counts.")] = 5,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per decode run.")] = 128,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Variant whose perplexity --max-ppl-increase compares with "
            "(default: the float source's, recorded at export).",
            exists=True,
        ),
    ] = None,
    max_ppl_increase: Annotated[str | None, typer.Option(help="e.g. 15%.")] = None,
    min_tokens_per_s: Annotated[float | None, typer.Option(help="Lowest acceptable decode speed.")] = None,
    max_ttft_ms: Annotated[float | None, typer.Option(help="Highest acceptable time to first token.")] = None,
    max_peak_rss_mb: Annotated[float | None, typer.Option(help="Highest acceptable peak RSS, MiB.")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Largest acceptable size on disk, MiB.")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Measure perplexity, decode tokens/s, time to first token, peak RSS and size; enforce gates.

    Inside an export folder the figures are kept in OUT/evaluation/<target>.json for `bundle create`.
    Exit code 3 when a gate fails.
    """
    from pydantic import ValidationError

    from slmops.build import evaluate as ev
    from slmops.build.export import evaluation_path, with_reference

    try:
        gates = ev.Gates(
            max_ppl_increase=max_ppl_increase,
            min_tokens_per_s=min_tokens_per_s,
            max_ttft_ms=max_ttft_ms,
            max_peak_rss_mb=max_peak_rss_mb,
            max_size_mb=max_size_mb,
        )
    except ValidationError as e:
        fail("; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors()), code=2)
    if gates.max_ppl_increase is not None and reference is None and evaluation_path(variant) is None:
        fail("--max-ppl-increase needs --reference VARIANT, or a variant inside an export folder", code=2)
    try:
        with err_console.status(f"evaluating {variant} ({runs} runs of {new_tokens} tokens, perplexity)"):
            evaluation = with_reference(ev.evaluate(variant, runs=runs, new_tokens=new_tokens), variant)
            if reference is not None:
                gates.reference_perplexity = ev.evaluate(reference, speed=False).perplexity
    except SlmopsError as e:
        fail(str(e))
    for path in filter(None, (evaluation_path(variant), output)):
        ev.save(evaluation, path)
    if as_json:
        print(json.dumps(evaluation.model_dump(mode="json"), indent=2))
    else:
        table = Table(title=f"{variant}  ({evaluation.measured_on}, {evaluation.runtime})")
        for column in ("figure", "value"):
            table.add_column(column)
        table.add_row(
            "perplexity (held-out)", f"{evaluation.perplexity:.3f} over {evaluation.perplexity_tokens} tokens"
        )
        if reference_ppl := gates.reference_perplexity or evaluation.reference_perplexity:
            table.add_row(
                "reference perplexity", f"{reference_ppl:.3f} ({evaluation.perplexity / reference_ppl - 1:+.2%})"
            )
        table.add_row("decode tokens/s (median)", f"{evaluation.decode_tokens_per_s or 0:.1f}")
        table.add_row("time to first token ms", f"{evaluation.time_to_first_token_ms or 0:.1f}")
        table.add_row("peak RSS MiB", f"{evaluation.peak_rss_bytes / 2**20:.1f}")
        table.add_row("size MiB", f"{evaluation.size_bytes / 2**20:.1f}")
        console.print(table)
    try:
        gates.check(evaluation, str(variant))
    except GateFailed as e:
        fail(str(e), code=GATE_FAILED_EXIT)


@app.command("finetune")
def finetune_cmd(
    model: Annotated[str, typer.Argument(help="Catalogue name, Hugging Face folder or .gguf file.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", exists=True, dir_okay=False, help='Chat JSONL: {"messages": [{"role", "content"}, ...]} a line.'
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the adapter (or model) and finetune.json.")],
    method: Annotated[str, typer.Option(help="lora (peft adapters) or full (every weight).")] = "lora",
    qlora: Annotated[bool, typer.Option(help="The base in 4 bits (bitsandbytes; a CUDA GPU).")] = False,
    validation: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Chat JSONL to validate on; default: a seeded share of --data."),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    learning_rate: Annotated[float | None, typer.Option(help="Default: 2e-4 (lora), 2e-5 (full).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    gradient_accumulation: Annotated[int, typer.Option(min=1)] = 1,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens a conversation is cut to.")] = 512,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha.")] = 16,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_module: Annotated[
        list[str] | None, typer.Option(help="A module LoRA adapts (repeat); default: every linear layer.")
    ] = None,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation loss before stopping.")] = 2,
    merge: Annotated[bool, typer.Option(help="Merge the adapter into the base and write the whole model.")] = False,
    resume: Annotated[bool, typer.Option(help="Go on from the last checkpoint in --out.")] = False,
    seed: int = 0,
) -> None:
    """Fine-tune on chat data (only the answers are learned): LoRA or every weight, validation each epoch,
    early stopping, a checkpoint per epoch (--resume), provenance in finetune.json."""
    from pydantic import ValidationError

    from slmops.build.finetune import FinetuneSettings, finetune

    try:
        settings = FinetuneSettings(
            method=method, qlora=qlora, rank=rank, alpha=alpha, dropout=dropout,
            target_modules=target_module or ["all-linear"], epochs=epochs, learning_rate=learning_rate,
            batch_size=batch_size, gradient_accumulation=gradient_accumulation, max_length=max_length,
            patience=patience, merge=merge, seed=seed,
        )  # fmt: skip
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()), code=2)
    record = _train("training", lambda on_step: finetune(model, data, out, settings, validation, resume, on_step))
    if not record:  # another process of a torchrun: the first one reports
        return
    trainable = record["trainable_parameters"]
    console.print(_epochs(f"{out} ({record['output']}, {trainable:,} trainable parameters)", record))
    if record["stopped_early"]:
        console.print(f"stopped early: no better validation loss for {settings.patience} epoch(s)")


distill_app = typer.Typer(help="Distillation: the teacher answers prompts (generate), the student learns them (train).")
app.add_typer(distill_app, name="distill")


@distill_app.command("generate")
def distill_generate_cmd(
    teacher: Annotated[str, typer.Option(help="The teacher: catalogue name, Hugging Face folder or .gguf file.")],
    prompts: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help='JSONL: {"id", "messages": [... the user\'s turn last]}.')
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for answers.jsonl (run again there to resume).")],
    temperature: Annotated[float, typer.Option(min=0, help="0: greedy; above: sampled.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0, max=1)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    top_k_logprobs: Annotated[int, typer.Option(min=0, max=100, help="Keep the teacher's K most likely tokens.")] = 0,
    keep_truncated: Annotated[bool, typer.Option(help="Keep answers cut by --max-new-tokens.")] = False,
    seed: int = 0,
) -> None:
    """The teacher answers every prompt (batched, resumable); duplicates, empty and truncated answers are
    filtered and counted; provenance in generate.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from slmops.build.teacher import GenerateSettings, generate

    settings = GenerateSettings(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
        top_k_logprobs=top_k_logprobs, keep_truncated=keep_truncated, seed=seed,
    )  # fmt: skip
    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("answering", total=None)
        try:
            record = generate(
                teacher, prompts, out, settings, lambda done, total: progress.update(task, completed=done, total=total)
            )
        except SlmopsError as e:
            fail(str(e))
    table = Table(title=f"{out} (teacher {teacher})")
    table.add_column("")
    table.add_column("prompts", justify="right")
    for name, count in record["counts"].items():
        table.add_row(name, str(count))
    console.print(table)


@distill_app.command("train")
def distill_train_cmd(
    teacher: Annotated[str, typer.Option(help="The teacher: catalogue name, Hugging Face folder or .gguf file.")],
    data: Annotated[Path, typer.Option(exists=True, help="The folder `distill generate` wrote, or its answers.jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the student and distill.json.")],
    student: Annotated[
        str | None, typer.Option(help="The student's initial weights (the teacher's tokenizer).")
    ] = None,
    keep_layers: Annotated[
        int | None, typer.Option(min=3, help="Or: a student of the teacher's N most influential layers.")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Or: the teacher's layers to keep, e.g. 0,1,2,4,29.")] = None,
    validation: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Chat JSONL to validate on.")
    ] = None,
    alpha: Annotated[
        float, typer.Option(min=0, max=1, help="Weight of the teacher's distribution (0: answers only).")
    ] = 0.5,
    beta: Annotated[float, typer.Option(min=0, max=1, help="GJSD: 0 forward KL, 1 reverse KL.")] = 0.0,
    temperature: Annotated[float, typer.Option(min=0.01)] = 2.0,
    teacher_distribution: Annotated[str, typer.Option(help="auto, stored (top-k in the data) or live.")] = "auto",
    on_policy: Annotated[
        float, typer.Option(min=0, max=1, help="Share of batches the student answers itself (GKD; slmops[trl]).")
    ] = 0.0,
    on_policy_new_tokens: Annotated[int, typer.Option(min=1, help="Length of the student's own answers.")] = 128,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    learning_rate: Annotated[float | None, typer.Option(help="Default 5e-5.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    gradient_accumulation: Annotated[int, typer.Option(min=1)] = 1,
    max_length: Annotated[int, typer.Option(min=8)] = 512,
    patience: Annotated[int, typer.Option(min=1)] = 2,
    resume: Annotated[bool, typer.Option(help="Go on from the last checkpoint in --out.")] = False,
    seed: int = 0,
) -> None:
    """The student learns the teacher's answers and its distribution over every answer token (stored top-k
    or the live teacher), with --on-policy also over answers of its own; validation each epoch, early
    stopping, checkpoints (--resume), distill.json."""
    from pydantic import ValidationError

    from slmops.build.distill import DistillSettings, distill

    try:
        settings = DistillSettings(
            alpha=alpha, beta=beta, temperature=temperature, teacher_distribution=teacher_distribution,
            on_policy=on_policy, on_policy_new_tokens=on_policy_new_tokens, epochs=epochs,
            learning_rate=learning_rate, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            max_length=max_length, patience=patience, seed=seed,
        )  # fmt: skip
        kept = [int(n) for n in layers.split(",")] if layers else None
    except (ValidationError, ValueError) as e:
        fail(str(e), code=2)
    record = _train(
        "distilling",
        lambda on_step: distill(teacher, data, out, settings, student, keep_layers, kept, validation, resume, on_step),
    )
    if not record:  # another process of a torchrun: the first one reports
        return
    distribution = record["teacher_distribution"]
    console.print(_epochs(f"{out}: {record['parameters']:,} parameters, teacher's distribution {distribution}", record))
    agreement = record["agreement"]
    console.print(f"agreement with the teacher: {agreement['before']:.1%} before, {agreement['after']:.1%} after")
    if "on_policy_batches" in record:
        console.print(f"the student answered itself on {record['on_policy_batches']} batches")


@app.command("score")
def score_cmd(
    model: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="A variant folder or a Hugging Face folder.")
    ],
    test: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Chat JSONL with a `key` per item.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Score the first N items only.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the score and answers as JSON.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Answer with this LoRA adapter of the variant active.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """The task score of a model on held-out items: exact match on the key fact and ROUGE-L, with bootstrap
    95 % intervals (a variant runs on the runtime that serves it; a Hugging Face folder on transformers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from slmops.build.chat_data import read_chat
    from slmops.build.task_score import score_model

    try:
        items = read_chat(test)[:limit]
        with Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), console=err_console) as progress:
            task = progress.add_task("answering", total=len(items))
            scored = score_model(
                model, items, max_new_tokens, lambda done: progress.update(task, completed=done), adapter
            )
    except (SlmopsError, ValueError) as e:
        fail(str(e))
    if output is not None:
        output.write_text(scored.model_dump_json(indent=2) + "\n")
    if as_json:
        print(scored.model_dump_json(indent=2))
        return
    table = Table(title=f"{model} on {test} ({scored.score.items} items)")
    for column in ("figure", "mean", "95 % interval"):
        table.add_column(column, justify="right")
    for name, figure in (("exact match (key fact)", scored.score.exact_match), ("ROUGE-L F1", scored.score.rouge_l)):
        table.add_row(name, f"{figure.mean:.3f}", f"{figure.low:.3f} – {figure.high:.3f}")
    console.print(table)


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The recipe (YAML).")],
    work: Annotated[
        Path | None, typer.Option(help="Where the stages go; default: a `work` folder beside the recipe.")
    ] = None,
    executor: Annotated[
        ExecutorName,
        typer.Option(
            help="local: every stage in this process; ray: each stage on the Ray cluster at --ray-address, "
            "the training stages with Ray Train over --train-workers processes (WORK must be shared)."
        ),
    ] = "local",
    ray_address: Annotated[str | None, typer.Option(help="The Ray cluster's address (HOST:PORT).")] = None,
    train_workers: Annotated[
        int, typer.Option(min=1, help="Processes that train each training stage on Ray (batch size is per process).")
    ] = 2,
) -> None:
    """Run a recipe: fine-tune the teacher, generate, distil the student, export, score, bundle. A stage
    whose inputs did not change since the last run is taken from WORK."""
    from slmops.build import executors, pipeline

    try:
        loaded = pipeline.load(recipe)
        runner = executors.executor(executor, ray_address, train_workers)
    except SlmopsError as e:
        fail(str(e), code=2)
    try:
        with err_console.status("starting") as status:

            def on_stage(stage: str, what: str) -> None:
                if what == "running":
                    status.update(f"{stage}: running")
                else:
                    err_console.print(f"{stage}: {what}")

            record = pipeline.run(loaded, work or recipe.parent / "work", on_stage, runner)
    except GateFailed as e:
        fail(str(e), code=GATE_FAILED_EXIT)
    except SlmopsError as e:
        fail(str(e))
    table = Table(title=f"{recipe}")
    for column in ("stage", "from", "seconds", "folder"):
        table.add_column(column)
    for name, stage in record["stages"].items():
        table.add_row(name, "cache" if stage["cached"] else "run", f"{stage['seconds']:.1f}", stage["folder"])
    console.print(table)
    for variant, score in record.get("scores", {}).items():
        console.print(
            f"{variant}: exact match {score['exact_match']['mean']:.3f} "
            f"({score['exact_match']['low']:.3f}–{score['exact_match']['high']:.3f}), "
            f"ROUGE-L {score['rouge_l']['mean']:.3f}"
        )


ControllerUrl = Annotated[
    str, typer.Option("--controller", envvar="SLMOPS_CONTROLLER_URL", help="Controller base URL.")
]
Token = Annotated[str | None, typer.Option(envvar="SLMOPS_TOKEN", help="API token (admin to submit or cancel).")]


@app.command("submit")
def submit_cmd(
    recipe: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The recipe (YAML).")],
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Send a recipe and the files it names to the controller, which runs it (`build jobs`, `build logs`)."""
    import tempfile

    from slmops.build import pipeline
    from slmops.controller.fleet_cli import answer, client

    with tempfile.TemporaryDirectory() as scratch:
        try:
            archive = pipeline.pack(recipe, Path(scratch) / "recipe.tar")
        except SlmopsError as e:
            fail(str(e), code=2)
        with client(controller, token) as api:
            job = answer(lambda: api.submit_build(archive))
    console.print(f"build {job.id} queued: slmops build logs {job.id} -f")


@app.command("jobs")
def jobs_cmd(
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """The controller's build jobs, newest first."""
    from slmops.controller.fleet_cli import answer, client

    with client(controller, token) as api:
        jobs = answer(api.builds)
    if as_json:
        print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
        return
    table = Table("id", "status", "stage", "bundle", "by", "detail")
    for j in jobs:
        made = f"{j.bundle_name} {j.bundle_version}" if j.bundle_name else ""
        table.add_row(str(j.id), j.status, j.stage, made, j.created_by, j.detail[-80:])
    console.print(table)


@app.command("logs")
def logs_cmd(
    build_id: Annotated[int, typer.Argument(help="Build job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """A build job's log (its stages' output); -f follows it until the job ends, then says how it ended."""
    import sys
    import time

    from slmops.controller.fleet_cli import answer, client

    with client(controller, token) as api:
        offset = 0
        while True:
            part = answer(lambda at=offset: api.build_log(build_id, at))
            sys.stdout.write(part.text)
            sys.stdout.flush()
            offset = part.offset
            if not follow or (part.finished and not part.text):
                break
            time.sleep(1)
        job = answer(lambda: api.build(build_id))
    if follow:
        err_console.print(f"build {job.id}: {job.status} {job.detail}")
        if job.status != "succeeded":
            raise typer.Exit(1)


@app.command("cancel")
def cancel_cmd(
    build_id: Annotated[int, typer.Argument(help="Build job id.")],
    controller: ControllerUrl = "http://127.0.0.1:8700",
    token: Token = None,
) -> None:
    """Cancel a queued build job, or stop a running one."""
    from slmops.controller.fleet_cli import answer, client

    with client(controller, token) as api:
        job = answer(lambda: api.cancel_build(build_id))
    console.print(f"build {job.id}: {job.status}{' (stopping)' if job.status == 'running' else ''}")


def _train(what: str, run: "Callable[[Callable[[int, int, dict[str, float]], None]], dict]") -> dict:
    """Run a training with a progress bar (step, total, the last losses); its record, or fail on an error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task(what, total=None)

        def on_step(step: int, total: int, figures: dict[str, float]) -> None:
            shown = " · ".join(f"{k} {figures[k]:.4g}" for k in ("loss", "eval_loss") if k in figures)
            progress.update(task, completed=step, total=total, description=f"{what} {shown}".strip())

        try:
            return run(on_step)
        except SlmopsError as e:
            fail(str(e))


def _epochs(title: str, record: dict) -> Table:
    """A training record's losses per epoch, the best marked."""
    table = Table(title=title)
    for column in ("epoch", "train loss", "validation loss"):
        table.add_column(column, justify="right")
    for epoch in record["epochs"]:
        best = " (best)" if epoch["epoch"] == record["best_epoch"] else ""
        train = "-" if epoch["train_loss"] is None else f"{epoch['train_loss']:.4f}"
        table.add_row(str(epoch["epoch"]), train, f"{epoch['validation_loss']:.4f}{best}")
    return table
