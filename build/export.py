"""Export a source checkpoint into one variant per hardware target.

    Recipe (targets + options) ─► validate every target first ─► resolve source
      ├─ the float source's perplexity on the held-out text (the reference)
      ├─ the int4 blocks, made once: a GGUF source's own, or --quant's from the float weights
      └─ per target ─► variants/<target>/
           ├─ onnxruntime-genai targets: the model builder, in a child process (its output
           │  goes to logs/<target>.log), then the blocks written into its cpu-int4 graph, then
           │  the recipe's LoRA adapters beside the base graph (build/adapters.py)
           ├─ openvino targets: slmops' own OpenVINO IR with the same blocks (openvino_ir)
           └─ a variant that runs here (CPU): its perplexity ─► evaluation/<target>.json
      ─► build.json (provenance, each variant's accuracy and gate)
           ─► GateFailed where a variant lost more than --max-ppl-increase (default 5 %)

The accuracy gate is on by default: a quantized variant that answers worse than its float
source by more than the bound fails the build with the figure, the bound and a better
choice to try; build.json keeps the failure, and `bundle create` refuses that variant.

A GPU or NPU variant is built on any machine that has its tools: the builder (or
openvino_ir) writes the graph and weights without running them. A target whose tools are
missing (the openvino extra; Olive and Qualcomm's SDK for qnn-npu, see `slmops.targets`)
fails before any work.
"""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from slmops.bundle import VARIANTS_DIR
from slmops.errors import BuildError, GateFailed, TargetError
from slmops.manifest import ADAPTER_NAME, Adapter, Evaluation, canonical_json, tree_digest
from slmops.targets import Target, target

from . import evaluate, models, openvino_ir, qnn_graph
from .adapters import LoraAdapter, add_lora_inputs, read_adapter, write_adapter
from .block_graph import write_blocks
from .blocks import BLOCK, BlockWeight
from .gguf_blocks import gguf_matrices
from .qnn_graph import QnnSoc
from .quantize import BODY_QUANTIZERS, float_matrices

BUILD_RECORD = "build.json"
LOGS_DIR = "logs"
EVALUATION_DIR = "evaluation"
GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_PPL_INCREASE = 0.05
"""The accuracy gate's default bound: 5 % more perplexity than the float source."""


QuantMethod = Literal["imatrix", "imatrix-asym", "k-quant-mixed", "rtn"]
QUANT_METHODS: dict[str, str] = {
    "imatrix": "int4 blocks fitted to the importance of each input on the shipped calibration text, "
    "8-bit lm_head and tied embedding; the stock int4 kernel, as fast as rtn, ~16 % larger (cpu-int4; default)",
    "imatrix-asym": "as imatrix on an asymmetric grid (a float offset per block, like GGUF's Q4_1): "
    "the least loss; the offsets cost one small MatMul per matrix (~25 % slower) and ~30 % more than rtn",
    "k-quant-mixed": "the model builder's k-quant with llama.cpp's mixed strategy: int8 lm_head and "
    "sensitive layers, asymmetric int4 elsewhere; ~30 % larger than rtn",
    "rtn": "the model builder's round-to-nearest int4, lm_head too: the smallest, the most loss",
}
"""How int4 weights are made from float ones, and what each costs (`build targets` shows them; the
sizes and speeds are SmolLM2-135M's in benchmarks/inference.py)."""
OWN_QUANT = tuple(BODY_QUANTIZERS)
"""Methods slmops runs itself (build/quantize.py) and writes into the builder's cpu-int4 graph."""


class QuantOptions(BaseModel):
    """Weight-only quantization of int4/int8 targets (onnxruntime MatMulNBits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: QuantMethod = "imatrix"
    """How int4 weights are made from float ones (QUANT_METHODS)."""
    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Weights per quantization block: smaller blocks keep more accuracy and cost more scales."""
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    """Compute type of the int4 MatMul: 4 = int8 (fastest on CPU), 1 = fp32. None: the builder's
    default, which is 4 on CPU and 0 on other providers."""

    @model_validator(mode="after")
    def _own_methods_block_by_32(self) -> "QuantOptions":
        if self.method in OWN_QUANT and self.block_size != BLOCK:
            raise ValueError(f"--quant {self.method} makes blocks of {BLOCK}; use --block-size {BLOCK} or --quant rtn")
        return self


FromGguf = Literal["exact", "dequantize"]


class Recipe(BaseModel):
    """Everything that decides the bytes of the variants; its digest goes into the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    targets: list[str] = Field(min_length=1)
    quant: QuantOptions = QuantOptions()
    from_gguf: FromGguf = "exact"
    """A source dequantized from a GGUF: `exact` carries its blocks into the cpu-int4 variant (every
    weight is the GGUF's); `dequantize` lets the builder re-round the float weights."""
    qnn_soc: QnnSoc = qnn_graph.DEFAULT_SOC
    """The Snapdragon SoC the qnn-npu variant's context binary is compiled for."""
    adapters: dict[str, str] = {}
    """LoRA adapters (name -> peft adapter folder) every variant carries beside its base graph
    (build/adapters.py): the agent picks one per request by model name."""

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not re.match(ADAPTER_NAME, name):
                raise ValueError(f"adapter name {name!r}: use lowercase letters, digits, '-' and '_', a letter first")
        return adapters

    @model_validator(mode="after")
    def _adapters_on_builder_targets(self) -> "Recipe":
        if self.adapters:
            others = [t for t in self.targets if target(t).builder_precision is None]
            if others:
                raise ValueError(f"runtime adapters ship on onnxruntime-genai targets only, not {', '.join(others)}: "
                                 "merge the adapter into the source for those (build finetune --merge)")  # fmt: skip
        return self

    @field_validator("targets")
    @classmethod
    def _known_and_unique(cls, ids: list[str]) -> list[str]:
        for t in ids:
            try:
                target(t)
            except TargetError as e:
                raise ValueError(str(e)) from None
        if len(set(ids)) != len(ids):
            raise ValueError("a target is named twice")
        return ids

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()


class Accuracy(BaseModel):
    """A variant's perplexity against its float source's, and the gate's verdict."""

    perplexity: float
    reference_perplexity: float
    max_increase: float | None
    """The gate's bound; None where the build ran without one (recorded, not gated)."""
    measured_on: str = "the variant itself, on the held-out text"
    """What was scored against what: qnn-npu's binary runs on a slow simulator here, so a short
    stretch of the held-out text is scored, against its float graph on the same tokens."""

    @property
    def increase(self) -> float:
        return self.perplexity / self.reference_perplexity - 1

    @property
    def passed(self) -> bool:
        return self.max_increase is None or self.increase <= self.max_increase


class VariantRecord(BaseModel):
    target: str
    build_options: dict[str, str | int | float | bool]
    builder: str
    seconds: float
    quant: str | None = None
    """What made the int4/int8 weights: `gguf-exact` (the GGUF's own blocks) or a QuantMethod; None
    for a float variant."""
    blocks: dict[str, int] | None = None
    """Matrices slmops wrote in place of the builder's, per block kind (and how many have an offset
    term); None where the builder's weights were kept."""
    adapters: list[Adapter] = []
    accuracy: Accuracy | None = None
    """None where the variant cannot run on the build machine (a GPU variant built on a CPU)."""


class Reference(BaseModel):
    """The float source's perplexity on the held-out text: what every variant is compared with."""

    perplexity: float
    tokens: int
    measured_with: str


class BuildRecord(BaseModel):
    """build.json: what was built, from what, how."""

    recipe: Recipe
    recipe_digest: str
    source_path: str
    source_digest: str
    created: datetime
    reference: Reference | None = None
    variants: dict[str, VariantRecord]

    @classmethod
    def load(cls, build_dir: Path) -> "BuildRecord":
        path = build_dir / BUILD_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{build_dir} is not an export folder: no {BUILD_RECORD}")
        return cls.model_validate_json(path.read_text())


OPENVINO_PACKAGES = ("openvino", "openvino_tokenizers", "openvino_genai")
QNN_PACKAGE = "onnxruntime_qnn"


def missing_tools(t: Target) -> bool:
    """Whether this machine lacks what `t` is built with (`t.requires` says what)."""
    if t.openvino:
        return any(importlib.util.find_spec(p) is None for p in OPENVINO_PACKAGES)
    if t.qnn:
        return importlib.util.find_spec(QNN_PACKAGE) is None
    return t.builder_precision is None


def check_buildable(t: Target, quant: QuantOptions) -> None:
    if missing_tools(t):
        raise TargetError(f"target {t.id} cannot be built on this machine: it needs {t.requires}")
    if t.openvino and quant.method not in OWN_QUANT:
        raise TargetError(
            f"target {t.id} takes --quant {' or '.join(OWN_QUANT)} (or a GGUF's own blocks): "
            f"{quant.method} is the model builder's, for its ONNX graphs only"
        )


def builder_options(t: Target, quant: QuantOptions) -> dict[str, str | int | float | bool]:
    options: dict[str, str | int | float | bool] = {}
    if t.builder_provider == "cpu":
        # One MatMul for gate and up (they share their input), and one offset term less per layer:
        # SmolLM2 cpu-int4 with the GGUF's blocks decoded 111 -> 119 tokens/s; not tried on GPUs here.
        options["fuse_mlp_gate_up"] = True
    if t.quantized:
        options["block_size"] = quant.block_size
        if quant.accuracy_level is not None:
            options["accuracy_level"] = quant.accuracy_level
        if quant.method == "k-quant-mixed":
            options["algo_config"] = "k_quant_mixed"
    return options


def evaluation_path(variant: Path) -> Path | None:
    """Where an export folder keeps a variant's evaluation: <build>/evaluation/<target>.json."""
    build_dir = variant.resolve().parent.parent
    if variant.resolve().parent.name == VARIANTS_DIR and (build_dir / BUILD_RECORD).is_file():
        return build_dir / EVALUATION_DIR / f"{variant.name}.json"
    return None


def with_reference(evaluation: Evaluation, variant: Path) -> Evaluation:
    """The evaluation with the float reference of the export folder `variant` lies in, if any."""
    path = evaluation_path(variant)
    if path is None or evaluation.reference_perplexity is not None:
        return evaluation
    reference = BuildRecord.load(path.parent.parent).reference
    if reference is None:
        return evaluation
    return evaluation.model_copy(update={"reference_perplexity": reference.perplexity})


def export(
    recipe: Recipe,
    out: Path,
    force: bool = False,
    console: Console | None = None,
    max_ppl_increase: float | None = DEFAULT_MAX_PPL_INCREASE,
) -> BuildRecord:
    """Build every target of `recipe` into `out`; raises GateFailed (after writing build.json)
    where a variant's perplexity is more than `max_ppl_increase` above the float source's."""
    console = console or Console(stderr=True)
    plan = [target(t) for t in recipe.targets]
    for t in plan:
        check_buildable(t, recipe.quant)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    source = models.resolve(recipe.source, console=console)
    source_gguf = models.source_gguf(source)
    gguf = source_gguf if recipe.from_gguf == "exact" else None
    if gguf is not None and recipe.quant.block_size != BLOCK:
        raise TargetError(
            f"--from-gguf exact carries the GGUF's blocks of {BLOCK}: pass --block-size {BLOCK}, "
            "or --from-gguf dequantize to re-quantize"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / LOGS_DIR).mkdir()
    with console.status("hashing the source checkpoint"):
        source_digest = tree_digest(source)
    adapters = _read_adapters(recipe, source)
    reference = None
    if any(t.device_class == "cpu" or t.openvino or t.qnn for t in plan):
        with console.status("perplexity of the float source (the accuracy reference)"):
            ppl, tokens = evaluate.reference_perplexity(source)
        reference = Reference(
            perplexity=ppl, tokens=tokens, measured_with=f"transformers {metadata.version('transformers')} float32"
        )
    builder = f"onnxruntime-genai {metadata.version('onnxruntime-genai')} model builder"
    blocks = _Blocks(source, gguf, recipe.quant)
    records: dict[str, VariantRecord] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} targets"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("exporting", total=len(plan))
        for t in plan:
            progress.update(task, description=f"exporting {t.id}")
            started = time.monotonic()
            dest = out / VARIANTS_DIR / t.id

            def note(what: str, target_id: str = t.id) -> None:
                progress.update(task, description=f"{target_id}: {what}")

            made_by: str | None
            cards: list[Adapter] = []
            if t.openvino:
                options: dict[str, str | int | float | bool] = {}
                made_by, matrices = blocks.get(t, note)
                by_kind: dict[str, int] | None = openvino_ir.write_ir(source, dest, matrices, note)
                made_with = f"slmops openvino_ir, openvino {metadata.version('openvino')}"
            elif t.qnn:
                options = {"soc": recipe.qnn_soc}
                score = qnn_graph.write_qnn(source, dest, recipe.qnn_soc, note, score=reference is not None)
                made_by, by_kind = qnn_graph.QUANT, None
                made_with = f"slmops qnn_graph, onnxruntime-qnn {metadata.version('onnxruntime-qnn')}"
            else:
                options = builder_options(t, recipe.quant)
                _run_builder(source, dest, t, options, out / LOGS_DIR / f"{t.id}.log", out)
                made_by, by_kind = _own_blocks(blocks, dest, t, recipe.quant, note)
                made_with = builder
                if adapters:
                    note(f"adding {len(adapters)} adapters")
                    config = json.loads((source / "config.json").read_text())
                    branches = add_lora_inputs(dest, config, adapters)
                    cards = [write_adapter(dest, adapter, branches) for adapter in adapters]
                if t.device_class == "cpu":
                    _check_loads(dest, t)
            accuracy = None
            if t.qnn and score is not None:
                accuracy = Accuracy(
                    perplexity=score.perplexity,
                    reference_perplexity=score.float_perplexity,
                    max_increase=max_ppl_increase,
                    measured_on=f"the binary on onnxruntime-qnn's HTP simulator, {score.tokens} held-out tokens; "
                    "the reference: the float graph on the same tokens",
                )
            if reference is not None and (t.device_class == "cpu" or t.openvino):
                progress.update(task, description=f"perplexity of {t.id}")
                accuracy = _measure_accuracy(dest, reference, max_ppl_increase, out / EVALUATION_DIR)
                if t.device_class != "cpu":  # an NPU's IR, scored on OpenVINO's CPU plugin
                    accuracy.measured_on = "the IR (the NPU's weights) on OpenVINO's CPU plugin, on the held-out text"
            records[t.id] = VariantRecord(
                target=t.id,
                build_options=options,
                builder=made_with,
                seconds=round(time.monotonic() - started, 2),
                quant=made_by,
                blocks=by_kind,
                adapters=cards,
                accuracy=accuracy,
            )
            progress.advance(task)
    record = BuildRecord(
        recipe=recipe,
        recipe_digest=recipe.digest(),
        source_path=str(source),
        source_digest=source_digest,
        created=datetime.now(UTC),
        reference=reference,
        variants=records,
    )
    (out / BUILD_RECORD).write_text(record.model_dump_json(indent=2) + "\n")
    failed = {v.target: v.accuracy for v in records.values() if v.accuracy is not None and not v.accuracy.passed}
    if failed:
        raise GateFailed(
            "the accuracy gate failed:\n  - "
            + "\n  - ".join(_gate_failure(target(t), a, recipe, source_gguf is not None) for t, a in failed.items())
            + f"\n(recorded in {out / BUILD_RECORD}; `bundle create` refuses these variants)"
        )
    return record


def _read_adapters(recipe: Recipe, source: Path) -> list[LoraAdapter]:
    """The recipe's adapters, each checked to have been trained on `source` where its finetune.json says."""
    adapters = [read_adapter(name, Path(folder)) for name, folder in recipe.adapters.items()]
    if adapters:
        digest = models.weights_digest(source)
        for adapter in adapters:
            if adapter.base_digest is not None and adapter.base_digest != digest:
                raise BuildError(
                    f"adapter {adapter.name} was trained on another model: its finetune.json names weights "
                    f"{adapter.base_digest[:12]}, {source} has {digest[:12]}"
                )
    return adapters


def _measure_accuracy(
    dest: Path, reference: Reference, max_ppl_increase: float | None, evaluation_dir: Path
) -> Accuracy:
    """The variant's perplexity (in a fresh process), kept as its evaluation for `bundle create`."""
    measured = evaluate.evaluate(dest, speed=False)
    evaluation = Evaluation.model_validate(measured.model_dump() | {"reference_perplexity": reference.perplexity})
    evaluate.save(evaluation, evaluation_dir / f"{dest.name}.json")
    assert evaluation.perplexity is not None
    return Accuracy(
        perplexity=evaluation.perplexity, reference_perplexity=reference.perplexity, max_increase=max_ppl_increase
    )


def _gate_failure(t: Target, accuracy: Accuracy, recipe: Recipe, from_gguf: bool) -> str:
    """The figure, the bound, and what to try instead."""
    assert accuracy.max_increase is not None
    tries = []
    if recipe.from_gguf == "dequantize" and from_gguf:
        tries.append("--from-gguf exact (the GGUF's own blocks, lossless)")
    if t.precision == "int4":
        if (
            t.id == "cpu-int4"
            and recipe.quant.method != "imatrix-asym"
            and not (from_gguf and recipe.from_gguf == "exact")
        ):
            tries.append("--quant imatrix-asym (the least loss of the float quantizers)")
        if recipe.quant.block_size > BLOCK:
            tries.append(f"--block-size {BLOCK}")
        tries.append(
            "the openvino-npu-int8 target (1.5 × the size)"
            if t.openvino
            else "the cpu-int8 target (about twice the size)"
        )
    tries.append("--max-ppl-increase with a looser bound if this loss is acceptable")
    return (
        f"{t.id}: perplexity {accuracy.perplexity:.3f} is {accuracy.increase:+.1%} against the float source's "
        f"{accuracy.reference_perplexity:.3f}; the bound is {accuracy.max_increase:.1%}. Try " + ", or ".join(tries)
    )


def _run_builder(
    source: Path, dest: Path, t: Target, options: dict[str, str | int | float | bool], log: Path, out: Path
) -> None:
    assert t.builder_precision is not None and t.builder_provider is not None
    cache = out / ".builder-cache"
    extra = [
        "hf_token=false",
        *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()),
    ]
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(source),
        "-o",
        str(dest),
        "-p",
        t.builder_precision,
        "-e",
        t.builder_provider,
        "-c",
        str(cache),
        "--extra_options",
        *extra,
    ]
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0 or not (dest / GENAI_CONFIG).is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise TargetError(f"the model builder failed for {t.id} (exit {result.returncode}); see {log}:\n{tail}")
    _fill_chat_template(source, dest)


class _Blocks:
    """The int4 blocks of an export, made once and shared by every variant that carries them
    (cpu-int4's ONNX graph and the OpenVINO IR stand for the same weights)."""

    def __init__(self, source: Path, gguf: Path | None, quant: QuantOptions) -> None:
        self.source, self.gguf, self.quant = source, gguf, quant
        self._made: dict[str, dict[str, BlockWeight]] = {}

    def get(self, t: Target, progress: Callable[[str], None]) -> tuple[str, dict[str, BlockWeight]]:
        """What made `t`'s blocks and the matrices: the GGUF's own, or `--quant`'s from the float
        weights; an NPU takes symmetric blocks only: imatrix (int4) or int8, whatever the others."""
        if t.device_class == "npu":
            made_by = "int8" if t.precision == "int8" else "imatrix"
        elif self.gguf is not None:
            made_by = "gguf-exact"
        else:
            made_by = self.quant.method
        if made_by not in self._made:
            if made_by == "gguf-exact":
                assert self.gguf is not None
                progress("carrying the GGUF's blocks")
                config = json.loads((self.source / "config.json").read_text())
                self._made[made_by] = gguf_matrices(
                    self.gguf, config["num_attention_heads"], config["num_key_value_heads"]
                )
            else:
                self._made[made_by] = float_matrices(self.source, made_by, progress)
        return made_by, self._made[made_by]


def _own_blocks(
    blocks: _Blocks, dest: Path, t: Target, quant: QuantOptions, progress: Callable[[str], None]
) -> tuple[str | None, dict[str, int] | None]:
    """Write the GGUF's blocks, or slmops' own quantization, into the builder's cpu-int4 graph.
    Returns what made the variant's weights and, where slmops wrote them, the blocks per kind."""
    if not t.quantized:
        return None, None
    if t.id != "cpu-int4":  # the graphs of other int4 targets keep the builder's own quantization
        return ("rtn" if quant.method in OWN_QUANT else quant.method), None
    if blocks.gguf is None and quant.method not in OWN_QUANT:
        return quant.method, None
    made_by, matrices = blocks.get(t, progress)
    written = write_blocks(dest, matrices)
    return made_by, {**written.by_kind, "with_offsets": written.with_offsets}


def _check_loads(dest: Path, t: Target) -> None:
    """A CPU variant must load here; the builder can emit graphs onnxruntime rejects (e.g. asymmetric
    int4 with tied embeddings in onnxruntime-genai 0.18). Checked in a child: loading maps the weights."""
    probe = "import sys, onnxruntime_genai as og; og.Model(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", probe, str(dest)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TargetError(f"the model builder made a {t.id} variant that onnxruntime-genai cannot load: {reason}")


def _fill_chat_template(source: Path, dest: Path) -> None:
    """Keep the chat template beside the variant: serving needs it to turn messages into a prompt."""
    if not (dest / "chat_template.jinja").exists():
        tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
        template = tokenizer_config.get("chat_template")
        if isinstance(template, str):
            (dest / "chat_template.jinja").write_text(template)
