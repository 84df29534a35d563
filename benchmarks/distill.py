"""The example task end to end on the real SmolLM2-135M-Instruct, on this machine, in one run: a teacher
tuned with LoRA, a layer-subset student healed by distillation, both int4, against what a user would run
without us (the teacher in transformers, fp32).

    teacher      SmolLM2 + LoRA on the task's training answers (merged)           build/finetune
                 and the same LoRA unmerged, beside SmolLM2's int4 at run time      build/adapters
    answers      the teacher answers the training prompts, greedy, top-8 kept     build/teacher
    student      --keep-layers of its 30 layers by block influence                 build/student
    distilled    the student healed by distillation (CE + forward KL on the top-8)  build/distill
    gold         the same student trained on the gold answers alone: what distillation itself adds
    variants     cpu-int4 of the teacher, the student before distillation, distilled and gold
    scores       each on the held-out test questions (exact match on the key fact, ROUGE-L, 95 %
                 intervals): the teacher fp32 in transformers, and the int4 variants in our runtime
    speed        time per token and peak RSS: the teacher fp32 in transformers, the teacher int4 and
                 the distilled student int4 in our runtime, each in a fresh process, --rounds rounds
                 interleaved (median and range)

Targets (issue 15): student int4 against teacher fp32 (transformers): at least 90 % less time per token and
80 % less peak RSS at 92 % or more of its task score; against teacher int4: faster in proportion to the
layers removed at 92 % or more of its score. Every step's output is kept in --work and reused when it is
there (delete it to measure again). Prints a table; writes benchmarks/results/distill.json and
benchmarks/results/distill.png.

Every training and generation setting is the example recipe's (examples/support-task/recipe.yaml); the
student trained on gold answers takes its distillation's epochs, learning rate and batch size.

    python benchmarks/distill.py [--keep-layers N] [--test-items 240] [--rounds 3] [--work DIR]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from common import RESULTS, write_report
from inference import in_child, run_ours, run_transformers

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "support-task"
TEACHER = "smollm2-135m-instruct"


def step(work: Path, name: str, make, console) -> Path:
    """`make(out)` once: its folder is kept and reused by the next run."""
    out = work / name
    if (out / ".done").is_file():
        console.print(f"{name}: reused from {out}")
        return out
    started = time.monotonic()
    console.print(f"{name}: running")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    make(out)
    (out / ".done").write_text("")
    console.print(f"{name}: {time.monotonic() - started:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-layers", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--test-items", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=RESULTS / "distill-work")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from slmops.build import models
    from slmops.build.chat_data import read_chat
    from slmops.build.distill import DistillSettings, distill
    from slmops.build.export import Recipe, export
    from slmops.build.finetune import FinetuneSettings, finetune
    from slmops.build.pipeline import PipelineRecipe
    from slmops.build.student import make_student
    from slmops.build.task_score import score_model
    from slmops.build.teacher import GenerateSettings, generate

    console = Console()
    work, data = args.work, EXAMPLE / "data"
    work.mkdir(parents=True, exist_ok=True)
    test = read_chat(data / "test.jsonl")[: args.test_items]
    base = models.resolve(TEACHER, console=console)
    started = time.monotonic()

    # The example recipe's own settings, stage by stage (its paths are the shipped data's)
    recipe = PipelineRecipe.model_validate(yaml.safe_load((EXAMPLE / "recipe.yaml").read_text()))
    assert recipe.finetune is not None and recipe.student.keep_layers is not None
    lora = FinetuneSettings(**recipe.finetune.model_dump(exclude={"data", "validation"}))
    keep = args.keep_layers or recipe.student.keep_layers
    teacher = step(work, "teacher", lambda out: finetune(str(base), data / "train.jsonl", out, lora,
                                                         data / "validation.jsonl"), console)  # fmt: skip
    answering = GenerateSettings(**recipe.generate.model_dump(exclude={"prompts"}))
    answered = step(work, "answers", lambda out: generate(str(teacher), data / "prompts.jsonl", out, answering),
                    console)  # fmt: skip
    calibration = ["\n".join(t.content for t in c.messages) for c in read_chat(answered / "answers.jsonl")[:128]]
    student = step(work, "student", lambda out: make_student(str(teacher), out, keep=keep, calibration=calibration),
                   console)  # fmt: skip
    healing = DistillSettings(**recipe.distill.model_dump(exclude={"validation"}))
    distilled = step(work, "distilled", lambda out: distill(str(teacher), answered, out, healing, student=str(student)),
                     console)  # fmt: skip
    gold_settings = FinetuneSettings(method="full", epochs=healing.epochs, learning_rate=healing.learning_rate,
                                     batch_size=healing.batch_size, max_length=healing.max_length)  # fmt: skip
    gold = step(work, "gold", lambda out: finetune(str(student), data / "train.jsonl", out, gold_settings,
                                                   data / "validation.jsonl"), console)  # fmt: skip

    def int4(name: str, source: Path) -> Path:
        folder = step(work, f"{name}-int4", lambda out: export(Recipe(source=str(source), targets=["cpu-int4"]), out,
                                                             force=True, max_ppl_increase=None), console)  # fmt: skip
        return folder / "variants" / "cpu-int4"

    variants = {
        "teacher int4": int4("teacher", teacher),
        "student before distillation int4": int4("student", student),
        "student distilled int4": int4("distilled", distilled),
        "student on gold answers int4": int4("gold", gold),
    }
    # The same LoRA not merged: SmolLM2's own int4 blocks and the adapter beside them, float (build/adapters)
    adapter = step(work, "teacher-adapter-int4", lambda out: export(Recipe(
        source=TEACHER, targets=["cpu-int4"], adapters={"support": str(best_checkpoint(teacher))}), out, force=True,
        max_ppl_increase=None), console) / "variants" / "cpu-int4"  # fmt: skip
    contenders = {name: (model, None) for name, model in {"teacher fp32 (transformers)": teacher, **variants}.items()}
    contenders["teacher int4 + its LoRA at run time"] = (adapter, "support")
    scores = {}
    for name, (model, adapter_name) in contenders.items():
        scored_file = work / "scores" / f"{name}.json"
        if not scored_file.is_file():
            console.print(f"scoring {name} on {len(test)} held-out items")
            scored_file.parent.mkdir(exist_ok=True)
            scored = score_model(model, test, args.max_new_tokens, adapter=adapter_name)
            scored_file.write_text(scored.model_dump_json(indent=2))
        scores[name] = json.loads(scored_file.read_text())["score"]

    speed_of = {"teacher fp32 (transformers)": (run_transformers, str(teacher)),
                "teacher int4": (run_ours, str(variants["teacher int4"])),
                "student distilled int4": (run_ours, str(variants["student distilled int4"]))}  # fmt: skip
    rounds: dict[str, list[dict]] = {name: [] for name in speed_of}
    for r in range(args.rounds):
        for name, (fn, where) in speed_of.items():
            console.print(f"round {r + 1}: {name}")
            rounds[name].append(in_child(fn, where, 3, 128, 2, False))

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "low": min(values), "high": max(values)}

    speed = {
        name: {
            "ms_per_token": spread([1000 / run["decode_tokens_per_s"] for run in rounds[name]]),
            "peak_rss_mib": spread([run["peak_rss_bytes"] / 2**20 for run in rounds[name]]),
            "ttft_ms": spread([run["ttft_ms"] for run in rounds[name]]),
        }
        for name in speed_of
    }
    teacher_fp32, teacher_int4, student_int4 = (
        "teacher fp32 (transformers)", "teacher int4", "student distilled int4")  # fmt: skip
    distilled_record = json.loads((distilled / "distill.json").read_text())
    layers = json.loads((student / "student.json").read_text())
    targets = {
        "time per token vs teacher fp32": 1
        - speed[student_int4]["ms_per_token"]["median"] / speed[teacher_fp32]["ms_per_token"]["median"],
        "peak RSS vs teacher fp32": 1
        - speed[student_int4]["peak_rss_mib"]["median"] / speed[teacher_fp32]["peak_rss_mib"]["median"],
        "task score (exact match) vs teacher fp32": scores[student_int4]["exact_match"]["mean"]
        / max(scores[teacher_fp32]["exact_match"]["mean"], 1e-9),
        "speed-up vs teacher int4": speed[teacher_int4]["ms_per_token"]["median"]
        / speed[student_int4]["ms_per_token"]["median"],
        "speed-up expected from the layers": layers["teacher_layers"] / len(layers["layers"]),
        "task score (exact match) vs teacher int4": scores[student_int4]["exact_match"]["mean"]
        / max(scores[teacher_int4]["exact_match"]["mean"], 1e-9),
    }
    table = Table(title=f"SmolLM2 on the Nimbus support task: {len(test)} held-out items, {args.rounds} rounds")
    for column in ("model", "exact match (95 % CI)", "ROUGE-L", "ms/token", "peak RSS MiB", "TTFT ms"):
        table.add_column(column, justify="right")
    for name, score in scores.items():
        em, rl = score["exact_match"], score["rouge_l"]
        s = speed.get(name)
        table.add_row(
            name, f"{em['mean']:.3f} ({em['low']:.3f}–{em['high']:.3f})", f"{rl['mean']:.3f}",
            "-" if s is None else _spread(s["ms_per_token"]),
            "-" if s is None else f"{s['peak_rss_mib']['median']:.0f}",
            "-" if s is None else f"{s['ttft_ms']['median']:.1f}",
        )  # fmt: skip
    console.print(table)
    for name, value in targets.items():
        console.print(f"{name}: {value:.3f}")
    console.print(f"agreement with the teacher: {distilled_record['agreement']}")
    report = {
        "test_items": len(test), "rounds": args.rounds, "keep_layers": keep, "student_layers": layers,
        "recipe": recipe.model_dump(mode="json"),
        "scores": scores, "speed": speed, "targets": targets, "distill": distilled_record,
        "seconds": time.monotonic() - started,
    }  # fmt: skip
    _plot(scores, speed, RESULTS / "distill.png")
    write_report("distill", report, console)


def best_checkpoint(tuned: Path) -> Path:
    """The LoRA adapter of the epoch a fine-tuning kept (its trainer saves the adapter alone per epoch)."""
    states = sorted((tuned / "checkpoints").glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    best = json.loads(states[-1].read_text())["best_model_checkpoint"]
    return tuned / "checkpoints" / Path(best).name


def _spread(figure: dict) -> str:
    return f"{figure['median']:.2f} ({figure['low']:.2f}–{figure['high']:.2f})"


def _plot(scores: dict, speed: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(scores)
    means = [scores[n]["exact_match"]["mean"] for n in names]
    errors = [[scores[n]["exact_match"]["mean"] - scores[n]["exact_match"]["low"] for n in names],
              [scores[n]["exact_match"]["high"] - scores[n]["exact_match"]["mean"] for n in names]]  # fmt: skip
    left.barh(names, means, xerr=errors, capsize=4)
    left.set_xlabel("exact match on the key fact (95 % interval)")
    left.set_xlim(0, 1)
    for i, (name, s) in enumerate(speed.items()):
        point = (s["ms_per_token"]["median"], scores[name]["exact_match"]["mean"])
        right.scatter(*point, s=60)
        right.annotate(name, point, xytext=(4, 10 + 14 * i), textcoords="offset points", fontsize=8)
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_ylim(0, 1)
    right.set_xlabel("ms per token (median, log scale)")
    right.set_ylabel("exact match")
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
