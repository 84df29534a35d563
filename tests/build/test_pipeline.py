"""Recipes (slmops.build.pipeline, `slmops build run`): a bad recipe refused before any work with every
bad field named, the example recipe run end to end on a tiny teacher, and a re-run that reuses every
stage whose inputs did not change."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import SLMOPS

from slmops.build import pipeline
from slmops.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support-task"


def test_a_bad_recipe_is_refused_with_every_problem_at_once(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "teacher": "t",
                "generate": {"prompts": "p.jsonl", "temperature": -1},
                "student": {"keep_layers": 4, "layers": [0, 1]},
                "distill": {"alpha": 2},
                "colour": "red",
            }
        )
    )
    with pytest.raises(ConfigError) as refused:
        pipeline.load(recipe)
    message = str(refused.value)
    for field in ("generate.temperature", "student", "distill.alpha", "colour"):
        assert field in message, message
    recipe.write_text(yaml.safe_dump({"teacher": "t", "generate": {"prompts": "p.jsonl"}, "student": {"keep_layers": 4},
                                      "score": {"test": "missing.jsonl"}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"not found: .*p\.jsonl, .*missing\.jsonl"):
        pipeline.load(recipe)
    recipe.write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        pipeline.load(recipe)


def test_the_shipped_example_data_is_what_its_script_makes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, EXAMPLE / "make_data.py", "--out", str(tmp_path)], check=True, timeout=60)
    for name in ("train", "validation", "test", "prompts"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (EXAMPLE / "data" / f"{name}.jsonl").read_bytes()
    assert pipeline.PipelineRecipe.model_validate(yaml.safe_load((EXAMPLE / "recipe.yaml").read_text()))


def tiny_recipe(tmp_path: Path, signing_key) -> tuple[Path, dict]:
    """The example recipe on a 5-layer tiny teacher and a few items, written to tmp_path/recipe.yaml."""
    from slmops.build import models

    teacher = models.make_tiny(tmp_path / "teacher", layers=5, seed=2)
    shutil.copytree(EXAMPLE / "data", tmp_path / "data")
    (tmp_path / "data" / "prompts.jsonl").write_text(
        "".join((EXAMPLE / "data" / "prompts.jsonl").read_text().splitlines(True)[:12])
    )
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join((EXAMPLE / "data" / "train.jsonl").read_text().splitlines(True)[:24])
    )
    recipe = yaml.safe_load((EXAMPLE / "recipe.yaml").read_text())
    recipe["teacher"] = str(teacher)
    recipe["finetune"].update(epochs=1, batch_size=8)
    recipe["generate"].update(max_new_tokens=8, batch_size=12, keep_truncated=True, temperature=1.0)
    recipe["student"] = {"keep_layers": 3}
    recipe["distill"].update(epochs=1, batch_size=4)
    recipe["export"] = {"targets": ["cpu-fp32"], "max_ppl_increase": None}
    recipe["score"].update(limit=3, max_new_tokens=4, speed_runs=1)
    recipe["bundle"]["key"] = str(signing_key[0])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe


@pytest.mark.timeout(600)  # the whole recipe, twice (about 35 s here, alone)
def test_the_example_recipe_runs_on_a_tiny_teacher_and_a_rerun_reuses_its_stages(tmp_path: Path, signing_key) -> None:
    path, recipe = tiny_recipe(tmp_path, signing_key)
    first = subprocess.run([*SLMOPS, "build", "run", str(path)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    assert list(record["stages"]) == ["finetune", "generate", "distill", "export", "score", "bundle"]
    assert not any(stage["cached"] for stage in record["stages"].values())
    assert record["scores"]["cpu-fp32"]["items"] == 3
    bundle = Path(record["stages"]["bundle"]["folder"])
    assert json.loads((bundle / "manifest.json").read_text())["name"] == "nimbus-support"
    report = (tmp_path / "work" / "report.md").read_text()
    assert "| cpu-fp32 |" in report and "agreement with the teacher" in report
    for plot in ("training.png", "scores.png"):
        assert (tmp_path / "work" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    recipe["distill"]["learning_rate"] = 1e-4  # only what comes after distillation runs again
    path.write_text(yaml.safe_dump(recipe))
    second = subprocess.run([*SLMOPS, "build", "run", str(path)], capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    cached = {name: stage["cached"] for name, stage in again["stages"].items()}
    assert cached == {"finetune": True, "generate": True, "distill": False, "export": False, "score": False,
                      "bundle": False}  # fmt: skip
    assert "cache" in second.stdout


def test_the_ray_executor_without_an_address_is_refused_before_any_work(tmp_path: Path, signing_key) -> None:
    path, _ = tiny_recipe(tmp_path, signing_key)
    done = subprocess.run(
        [*SLMOPS, "build", "run", str(path), "--executor", "ray"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "--ray-address" in done.stderr
