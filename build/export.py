"""Export a source checkpoint into one onnxruntime-genai variant per hardware target.

    Recipe (targets + options) ─► validate every target first ─► resolve source
      └─ per target: onnxruntime-genai model builder, in a child process (its output
         goes to logs/<target>.log) ─► variants/<target>/ ─► build.json (provenance)

A GPU variant is built on any machine: the builder writes the graph and weights for
the provider without running them. NPU targets need Olive and vendor SDKs (see
`slmops.targets`); asking for one where they are missing fails before any work.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from slmops.bundle import VARIANTS_DIR
from slmops.errors import TargetError
from slmops.manifest import canonical_json, tree_digest
from slmops.targets import Target, target

from . import models
from .gguf_blocks import BLOCK

BUILD_RECORD = "build.json"
LOGS_DIR = "logs"
GENAI_CONFIG = "genai_config.json"


class QuantOptions(BaseModel):
    """Weight-only quantization of int4/int8 targets (onnxruntime MatMulNBits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Weights per quantization block: smaller blocks keep more accuracy and cost more scales."""
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    """Compute type of the int4 MatMul: 4 = int8 (fastest on CPU), 1 = fp32. None: the builder's
    default, which is 4 on CPU and 0 on other providers."""
    symmetric: bool = True
    """Symmetric int4/int8; asymmetric (uint4/uint8) adds a zero point per block."""


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


class VariantRecord(BaseModel):
    target: str
    build_options: dict[str, str | int | float | bool]
    builder: str
    seconds: float
    gguf_blocks: dict[str, int] | None = None
    """The GGUF's matrices carried in bit for bit, per block type (and how many have an offset term)."""


class BuildRecord(BaseModel):
    """build.json: what was built, from what, how."""

    recipe: Recipe
    recipe_digest: str
    source_path: str
    source_digest: str
    created: datetime
    variants: dict[str, VariantRecord]

    @classmethod
    def load(cls, build_dir: Path) -> "BuildRecord":
        path = build_dir / BUILD_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{build_dir} is not an export folder: no {BUILD_RECORD}")
        return cls.model_validate_json(path.read_text())


def check_buildable(t: Target) -> None:
    if t.builder_precision is None:
        raise TargetError(f"target {t.id} cannot be built on this machine: it needs {t.requires}")


def builder_options(t: Target, quant: QuantOptions) -> dict[str, str | int | float | bool]:
    options: dict[str, str | int | float | bool] = {}
    if t.quantized:
        options["block_size"] = quant.block_size
        if quant.accuracy_level is not None:
            options["accuracy_level"] = quant.accuracy_level
        options["is_symmetric"] = quant.symmetric
    return options


def export(recipe: Recipe, out: Path, force: bool = False, console: Console | None = None) -> BuildRecord:
    console = console or Console(stderr=True)
    plan = [target(t) for t in recipe.targets]
    for t in plan:
        check_buildable(t)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    source = models.resolve(recipe.source, console=console)
    gguf = models.source_gguf(source) if recipe.from_gguf == "exact" else None
    out.mkdir(parents=True, exist_ok=True)
    (out / LOGS_DIR).mkdir()
    with console.status("hashing the source checkpoint"):
        source_digest = tree_digest(source)
    builder = f"onnxruntime-genai {metadata.version('onnxruntime-genai')} model builder"
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
            options = builder_options(t, recipe.quant)
            started = time.monotonic()
            dest = out / VARIANTS_DIR / t.id
            _run_builder(source, dest, t, options, out / LOGS_DIR / f"{t.id}.log", out)
            carried = _carry_gguf(source, gguf, dest, t, recipe.quant) if gguf is not None else None
            if t.execution_provider == "cpu":
                _check_loads(dest, t)
            records[t.id] = VariantRecord(
                target=t.id,
                build_options=options,
                builder=builder,
                seconds=round(time.monotonic() - started, 2),
                gguf_blocks=carried,
            )
            progress.advance(task)
    record = BuildRecord(
        recipe=recipe,
        recipe_digest=recipe.digest(),
        source_path=str(source),
        source_digest=source_digest,
        created=datetime.now(UTC),
        variants=records,
    )
    (out / BUILD_RECORD).write_text(record.model_dump_json(indent=2) + "\n")
    return record


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


def _carry_gguf(source: Path, gguf: Path, dest: Path, t: Target, quant: QuantOptions) -> dict[str, int] | None:
    """The GGUF's own blocks in place of the builder's re-rounded ones, where the variant is the
    symmetric, 32-blocked int4 CPU graph the transcode knows; None where it is not."""
    from .gguf_transcode import carry_blocks

    if t.id != "cpu-int4" or not quant.symmetric or quant.block_size != BLOCK:
        return None
    config = json.loads((source / "config.json").read_text())
    carried = carry_blocks(dest, gguf, config["num_attention_heads"], config["num_key_value_heads"])
    return {**carried.by_type, "with_offsets": carried.with_offsets}


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
