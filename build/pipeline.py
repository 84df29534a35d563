"""A recipe: the whole way from a capable teacher to a signed bundle of a small student, in one file.

recipe.yaml ─► PipelineRecipe (pydantic, every bad field named at once; the files it names checked
               before any work; relative paths are the recipe's folder's)
stages, each in WORK/<stage>-<key> where key = sha256(the stage's settings, its input files' digests,
the keys of the stages it reads, and for a stage trained by several processes their number): a stage whose
folder is complete is skipped on a re-run, and any change upstream changes every key after it. Each runs
where the executor puts it (build/executors: here, or on a Ray cluster with Ray Train for training).

    finetune  (optional) the teacher adapted to the task: LoRA, merged        build/finetune
    generate  the (tuned) teacher answers the prompts                          build/teacher
    distill   the student learns them                                          build/distill
    export    the student, one variant per target, its accuracy gate           build/export
    score     (optional) each CPU variant on the held-out test items, with
              gates on exact match and ROUGE-L                                 build/task_score
    bundle    (optional) the variants signed into a bundle                     build/bundle

WORK/pipeline.json: every stage's key, folder, whether it ran or came from the cache, its seconds (the
stage under way: "running"), and the scores; WORK/report.md with its plots (build/report).
"""

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.build.distill import DistillSettings
from slmops.build.executors import Executor, LocalExecutor
from slmops.build.export import DEFAULT_MAX_PPL_INCREASE, QuantOptions
from slmops.build.finetune import FinetuneSettings
from slmops.build.teacher import GenerateSettings
from slmops.errors import ConfigError, GateFailed
from slmops.paths import replace_file

DONE = ".done"
RECORD = "pipeline.json"
OnStage = Callable[[str, str], None]
"""Called with (stage, what happens: running, cached, done)."""


class FinetuneStage(FinetuneSettings):
    data: Path
    validation: Path | None = None
    merge: bool = True  # the tuned teacher answers the prompts as a whole model


class GenerateStage(GenerateSettings):
    prompts: Path


class StudentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    keep_layers: int | None = Field(default=None, ge=3)
    layers: list[int] | None = None

    @model_validator(mode="after")
    def _one(self) -> "StudentSpec":
        if sum(v is not None for v in (self.model, self.keep_layers, self.layers)) != 1:
            raise ValueError("give one of model, keep_layers, layers")
        return self


class DistillStage(DistillSettings):
    validation: Path | None = None


class ExportStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=lambda: ["cpu-int4"], min_length=1)
    quant: QuantOptions = QuantOptions()
    max_ppl_increase: float | None = DEFAULT_MAX_PPL_INCREASE


class ScoreStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test: Path
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    min_exact_match: float | None = Field(default=None, ge=0, le=1)
    min_rouge_l: float | None = Field(default=None, ge=0, le=1)
    speed_runs: int = Field(default=3, ge=1)
    """Decode runs whose median is each variant's tokens/s (with its TTFT, peak RSS and size)."""


class BundleStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    key: Path
    description: str = ""


class PipelineRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str
    finetune: FinetuneStage | None = None
    generate: GenerateStage
    student: StudentSpec
    distill: DistillStage = DistillStage()
    export: ExportStage = ExportStage()
    score: ScoreStage | None = None
    bundle: BundleStage | None = None

    def files(self) -> list[Path]:
        """The files the recipe names (each must exist before any work)."""
        named: list[Path | None] = [self.generate.prompts, self.distill.validation]
        if self.finetune:
            named += [self.finetune.data, self.finetune.validation]
        if self.score:
            named.append(self.score.test)
        if self.bundle:
            named.append(self.bundle.key)
        return [path for path in named if path is not None]


def load(path: Path) -> PipelineRecipe:
    """The recipe at `path`, checked whole: every bad field and every missing file named in one error."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read as YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of stages (teacher, generate, student, ...)")
    try:
        recipe = PipelineRecipe.model_validate(_relative_to(raw, path.parent))
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from None
    missing = [str(p) for p in recipe.files() if not p.is_file()]
    if missing:
        raise ConfigError(f"{path}: file(s) not found: {', '.join(missing)}")
    return recipe


def pack(path: Path, out: Path) -> Path:
    """A tar of the recipe (as recipe.yaml) and the files it names, relative to its folder, for a
    controller to run (`slmops build submit`). Its bundle key stays here: the controller signs with its own."""
    import tarfile

    recipe = load(path)
    folder = path.parent.resolve()
    named = [p for p in recipe.files() if recipe.bundle is None or p != recipe.bundle.key]
    outside = [str(p) for p in named if not p.resolve().is_relative_to(folder)]
    if outside:
        raise ConfigError(f"{path}: file(s) outside the recipe's folder cannot be sent: {', '.join(outside)}")
    with tarfile.open(out, "w") as tar:
        tar.add(path, arcname="recipe.yaml")
        for file in sorted(set(named)):
            tar.add(file, arcname=str(file.resolve().relative_to(folder)))
    return out


def run(
    recipe: PipelineRecipe, work: Path, on_stage: OnStage | None = None, executor: Executor | None = None
) -> dict[str, Any]:
    """Run the recipe's stages into WORK, reusing every stage whose inputs did not change; each stage runs
    where `executor` puts it (build/executors: here by default, or on a Ray cluster)."""
    from slmops.build import bundle as bundles
    from slmops.build import distill, evaluate, finetune, models, report, task_score, teacher
    from slmops.build.chat_data import file_digest, read_chat
    from slmops.build.export import Recipe, export

    tell = on_stage or (lambda _stage, _what: None)
    runner = executor or LocalExecutor()
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"stages": {}}

    def save() -> None:  # whole: the controller reads it while a build job runs
        replace_file(work / RECORD, (json.dumps(record, indent=2) + "\n").encode())

    def stage(name: str, settings: BaseModel | None, inputs: dict[str, Any], make: Callable[[Path], None]) -> Path:
        processes = runner.processes(name)
        key = _key(name, settings, inputs | ({"processes": processes} if processes > 1 else {}))
        folder = work / f"{name}-{key[:12]}"
        started, cached = time.monotonic(), (folder / DONE).is_file()
        if cached:
            tell(name, "cached")
        else:
            tell(name, "running")
            record["stages"][name] = {"key": key, "folder": str(folder), "cached": False, "running": True,
                                      "executor": runner.name, "processes": processes}  # fmt: skip
            save()
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
            runner.run(name, make, partial)
            (partial / DONE).write_text(key + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            tell(name, "done")
        record["stages"][name] = {"key": key, "folder": str(folder), "cached": cached, "executor": runner.name,
                                  "processes": processes, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        save()
        return folder

    teacher_model = recipe.teacher
    teacher_key: dict[str, Any] = {
        "teacher": recipe.teacher,
        "digest": models.weights_digest(models.resolve(recipe.teacher)),
    }
    if recipe.finetune is not None:
        tuning = recipe.finetune
        settings = FinetuneSettings(**tuning.model_dump(exclude={"data", "validation"}))
        inputs = {**teacher_key, "data": file_digest(tuning.data), "validation": _digest(tuning.validation)}
        tuned = stage(
            "finetune", tuning, inputs,
            lambda out: finetune.finetune(recipe.teacher, tuning.data, out, settings, tuning.validation),
        )  # fmt: skip
        teacher_model, teacher_key = str(tuned), {"teacher": tuned.name}

    asked = recipe.generate
    answering = GenerateSettings(**asked.model_dump(exclude={"prompts"}))
    answered = stage(
        "generate", asked, {**teacher_key, "prompts": file_digest(asked.prompts)},
        lambda out: teacher.generate(teacher_model, asked.prompts, out, answering),
    )  # fmt: skip

    learning, student = recipe.distill, recipe.student
    inputs = {**teacher_key, "answers": answered.name, "student": student.model_dump(),
              "validation": _digest(learning.validation)}  # fmt: skip
    distilled = stage(
        "distill", learning, inputs,
        lambda out: distill.distill(
            teacher_model, answered, out, DistillSettings(**learning.model_dump(exclude={"validation"})),
            student.model, student.keep_layers, student.layers, learning.validation,
        ),
    )  # fmt: skip

    exporting = recipe.export
    exported = stage(
        "export", exporting, {"student": distilled.name},
        lambda out: export(Recipe(source=str(distilled), targets=exporting.targets, quant=exporting.quant), out,
                           force=True, max_ppl_increase=exporting.max_ppl_increase),
    )  # fmt: skip

    if recipe.score is not None:
        scoring = recipe.score

        def score(out: Path) -> None:
            items = read_chat(scoring.test)[: scoring.limit]
            out.mkdir(parents=True)
            for variant in sorted((exported / "variants").iterdir()):
                if variant.name.startswith("cpu-"):
                    scored = task_score.score_model(variant, items, scoring.max_new_tokens)
                    measured = evaluate.evaluate(variant, runs=scoring.speed_runs, new_tokens=scoring.max_new_tokens)
                    body = {**scored.model_dump(mode="json"), "evaluation": measured.model_dump(mode="json")}
                    (out / f"{variant.name}.json").write_text(json.dumps(body, indent=2) + "\n")

        scored_folder = stage("score", scoring, {"export": exported.name, "test": file_digest(scoring.test)}, score)
        scores = {p.stem: json.loads(p.read_text())["score"] for p in sorted(scored_folder.glob("*.json"))}
        record["scores"] = scores
        record["report"] = str(report.write(work, record))
        save()
        _check_gates(scoring, scores)

    if recipe.bundle is not None:
        packing = recipe.bundle
        stage(
            "bundle", packing, {"export": exported.name, "key": file_digest(packing.key)},
            lambda out: bundles.create(exported, out, name=packing.name, version=packing.version,
                                       description=packing.description, key=packing.key),
        )  # fmt: skip
    record["report"] = str(report.write(work, record))
    save()
    return record


def _check_gates(scoring: ScoreStage, scores: dict[str, Any]) -> None:
    misses = []
    for variant, score in scores.items():
        for figure, bound in (("exact_match", scoring.min_exact_match), ("rouge_l", scoring.min_rouge_l)):
            if bound is not None and score[figure]["mean"] < bound:
                misses.append(f"{variant} {figure} {score[figure]['mean']:.3f} < {bound}")
    if misses:
        raise GateFailed("task score gates failed: " + "; ".join(misses))


def _key(name: str, settings: BaseModel | None, inputs: dict[str, Any]) -> str:
    body = {"stage": name, "settings": settings.model_dump(mode="json") if settings else None, "inputs": inputs}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _digest(path: Path | None) -> str | None:
    from slmops.build.chat_data import file_digest

    return file_digest(path) if path else None


PATH_FIELDS = {"data", "validation", "prompts", "test", "key"}


def _relative_to(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The recipe with its file fields made absolute against the recipe's folder."""
    fixed: dict[str, Any] = {}
    for section, body in raw.items():
        if isinstance(body, dict):
            body = {k: str(folder / v) if k in PATH_FIELDS and isinstance(v, str) else v for k, v in body.items()}
        fixed[section] = body
    return fixed
