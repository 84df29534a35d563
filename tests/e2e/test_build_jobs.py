"""Build jobs on a controller process (controller/builds.py): a recipe submitted with `slmops build submit`
runs in a worker process (or on a Ray cluster), its log can be followed, and the bundle it makes is
registered; a running job is cancelled; a bad recipe is refused before it is queued; a job the controller
was running when it was killed resumes from the stages it had finished."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from controller_under_test import Controller, ControllerProcess
from support import SLMOPS, RayHead, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support-task"
pytestmark = pytest.mark.timeout(600)  # each runs the whole recipe (about 40 s here, alone), one twice


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmops.build import models

    return models.make_tiny(tmp_path_factory.mktemp("teacher") / "model", layers=5, seed=2)


def recipe(folder: Path, teacher: Path, distill_epochs: int = 1) -> Path:
    """The example recipe cut down to seconds on the tiny teacher, in `folder` with its data."""
    (folder / "data").mkdir(parents=True)
    for name, lines in (("train", 16), ("validation", 8), ("prompts", 8), ("test", 2)):
        kept = (EXAMPLE / "data" / f"{name}.jsonl").read_text().splitlines(True)[:lines]
        (folder / "data" / f"{name}.jsonl").write_text("".join(kept))
    body = yaml.safe_load((EXAMPLE / "recipe.yaml").read_text())
    body["teacher"] = str(teacher)
    body["finetune"].update(epochs=1, batch_size=8)
    body["generate"].update(max_new_tokens=6, batch_size=8, keep_truncated=True, temperature=1.0)
    body["student"] = {"keep_layers": 3}
    body["distill"].update(epochs=distill_epochs, batch_size=4)
    body["export"] = {"targets": ["cpu-fp32"], "max_ppl_increase": None}
    body["score"].update(limit=2, max_new_tokens=4, speed_runs=1)
    body["bundle"]["key"] = "keys/not-sent.key"  # the controller signs with its own key
    (folder / "keys").mkdir()
    (folder / "keys" / "not-sent.key").write_text("never uploaded")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def builder(tmp_path: Path, signing_key):
    process = ControllerProcess(
        tmp_path / "controller", "-k", str(signing_key[1]), build_signing_key=str(signing_key[0])
    ).start()
    controller = Controller(process.url, process.env["SLMOPS_TOKEN"])
    yield process, controller
    controller.api.close()
    process.stop()


def cli(process: ControllerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SLMOPS, "build", *args], env=process.env, capture_output=True, text=True, timeout=600)


def test_a_submitted_recipe_is_built_and_its_bundle_registered(builder, teacher: Path, tmp_path: Path) -> None:
    process, controller = builder
    submitted = cli(process, "submit", str(recipe(tmp_path / "r", teacher)))
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.split()[1])
    followed = cli(process, "logs", str(job_id), "-f")
    assert followed.returncode == 0, followed.stderr + followed.stdout[-2000:]
    assert "succeeded" in followed.stderr and "bundle: done" in followed.stdout
    job = controller.api.build(job_id)
    assert job.status == "succeeded" and (job.bundle_name, job.bundle_version) == ("nimbus-support", "1.0.0")
    assert set(job.stages) == {"finetune", "generate", "distill", "export", "score", "bundle"}
    assert controller.api.bundle("nimbus-support", "1.0.0").manifest["name"] == "nimbus-support"
    uploaded = process.data / "builds" / str(job_id) / "input"
    assert not (uploaded / "keys").exists(), "the recipe's own key is never sent"
    listed = cli(process, "jobs", "--json")
    assert json.loads(listed.stdout)[0]["id"] == job_id

    # the dashboard's build page: its stages, the log's tail and the report's plots
    import httpx

    with httpx.Client(base_url=process.url) as web:
        web.post("/ui/signin", data={"token": process.env["SLMOPS_TOKEN"]})
        page = web.get(f"/ui/builds/{job_id}").text
        assert "succeeded" in page and "bundle: done" in page
        assert all(f"<td>{stage}</td>" in page for stage in job.stages)
        plot = web.get(f"/ui/builds/{job_id}/training.png")
        assert f'src="/ui/builds/{job_id}/training.png"' in page and plot.content.startswith(b"\x89PNG")
        assert web.get(f"/ui/builds/{job_id}/log.txt").status_code == 404  # the plots only, nothing else there


def test_a_controller_with_the_ray_executor_builds_on_a_ray_cluster(teacher: Path, tmp_path: Path, signing_key) -> None:
    """build_executor = ray: each stage on a Ray head this test starts on loopback, fine-tuning and
    distillation with Ray Train over two processes (DDP); the bundle is registered as with `local`."""
    with RayHead(tmp_path) as head:
        process = ControllerProcess(
            tmp_path / "controller", "-k", str(signing_key[1]), build_signing_key=str(signing_key[0]),
            build_executor="ray", ray_address=head.address, ray_train_workers="2",
        ).start()  # fmt: skip
        controller = Controller(process.url, process.env["SLMOPS_TOKEN"])
        try:
            submitted = cli(process, "submit", str(recipe(tmp_path / "r", teacher)))
            job_id = int(submitted.stdout.split()[1])
            followed = cli(process, "logs", str(job_id), "-f")
            job = controller.api.build(job_id)
        finally:
            controller.api.close()
            process.stop()
    assert job.status == "succeeded", followed.stdout[-3000:]
    assert (job.bundle_name, job.bundle_version) == ("nimbus-support", "1.0.0")
    stages = json.loads((process.data / "builds" / str(job_id) / "work" / "pipeline.json").read_text())["stages"]
    assert {name: (s["executor"], s["processes"]) for name, s in stages.items()} == {
        "finetune": ("ray", 2), "generate": ("ray", 1), "distill": ("ray", 2), "export": ("ray", 1),
        "score": ("ray", 1), "bundle": ("ray", 1),
    }  # fmt: skip
    for stage, provenance in (("finetune", "finetune.json"), ("distill", "distill.json")):
        trained = json.loads((Path(stages[stage]["folder"]) / provenance).read_text())
        assert trained["processes"] == 2, f"{stage} was trained by {trained['processes']} process(es)"


def test_a_bad_recipe_is_refused_and_a_running_job_cancelled(builder, teacher: Path, tmp_path: Path) -> None:
    process, controller = builder
    path = recipe(tmp_path / "bad", teacher)
    broken = yaml.safe_load(path.read_text())
    broken["distill"]["alpha"] = 7
    broken["student"] = {}
    path.write_text(yaml.safe_dump(broken))
    refused = cli(process, "submit", str(path))
    assert refused.returncode == 2 and "distill.alpha" in refused.stderr and "student" in refused.stderr

    long = recipe(tmp_path / "long", teacher, distill_epochs=200)
    job_id = int(cli(process, "submit", str(long)).stdout.split()[1])
    wait_for(lambda: controller.api.build(job_id).stage == "distill", "the job did not reach distillation", 120, 0.5)
    cancelled = cli(process, "cancel", str(job_id))
    assert cancelled.returncode == 0
    done = wait_for(lambda: (j := controller.api.build(job_id)).status != "running" and j, "it was not stopped", 60)
    assert done.status == "cancelled"


def test_a_job_interrupted_by_a_controller_kill_resumes_from_its_finished_stages(
    builder, teacher: Path, tmp_path: Path
) -> None:
    process, controller = builder
    job_id = int(cli(process, "submit", str(recipe(tmp_path / "r", teacher, distill_epochs=60))).stdout.split()[1])
    wait_for(lambda: controller.api.build(job_id).stage == "distill", "the job did not reach distillation", 120, 0.2)
    worker = process.data / "builds" / str(job_id)
    process.stop(signal.SIGKILL)
    process.start()
    controller.api.close()
    restarted = Controller(process.url, process.env["SLMOPS_TOKEN"])
    try:
        done = wait_for(lambda: (j := restarted.api.build(job_id)).status in ("succeeded", "failed") and j,
                        "the job did not finish after the restart", 300, 1)  # fmt: skip
        assert done.status == "succeeded", done.detail
        assert done.stages["finetune"]["cached"] and done.stages["generate"]["cached"], done.stages
        assert not done.stages["distill"]["cached"], "the stage it was in ran again"
        assert (worker / "log.txt").read_text().count("finetune: done") == 1, "finetuned once, not twice"
    finally:
        restarted.api.close()
