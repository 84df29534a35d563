"""A build's report: WORK/report.md, a table of every variant's figures and the plots beside it (PNG).

stages        each stage: run or from the cache, its seconds
training      training.png: training and validation loss per epoch, fine-tuning and distillation
variants      task score (exact match, ROUGE-L, 95 % intervals), perplexity, decode tokens/s, time to
              first token, peak RSS and size, per scored variant; scores.png: the scores with their
              intervals
distillation  the student's agreement with the teacher before and after, its layers, its parameters
"""

import json
from pathlib import Path
from typing import Any

REPORT = "report.md"


def write(work: Path, record: dict[str, Any]) -> Path:
    """Write WORK/report.md (and its PNGs) from the pipeline's record and the stages' own records."""
    stages = record["stages"]
    lines = ["# Build report", "", "| stage | from | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'cache' if s['cached'] else 'run'} | {s['seconds']:.1f} |" for name, s in stages.items()]

    curves = {
        name: json.loads((Path(stages[name]["folder"]) / f"{name}.json").read_text())
        for name in ("finetune", "distill")
        if name in stages
    }
    if curves:
        _training_plot(curves, work / "training.png")
        lines += ["", "## Training", "", "![training curves](training.png)", ""]
        lines += ["| stage | epoch | training loss | validation loss |", "|---|---|---|---|"]
        for name, data in curves.items():
            for epoch in data["epochs"]:
                train = "-" if epoch["train_loss"] is None else f"{epoch['train_loss']:.4f}"
                best = " (best)" if epoch["epoch"] == data["best_epoch"] else ""
                lines.append(f"| {name} | {epoch['epoch']} | {train} | {epoch['validation_loss']:.4f}{best} |")
        if "distill" in curves:
            distilled = curves["distill"]
            made = distilled["student"].get("made_from_teacher")
            layers = f"the teacher's layers {made['layers']} of {made['teacher_layers']}" if made else "its own weights"
            agreement = distilled["agreement"]
            before, after = f"{agreement['before']:.1%}", f"{agreement['after']:.1%}"
            lines += ["", f"Student: {distilled['parameters']:,} parameters, from {layers}; agreement with the "
                      f"teacher {before} before distillation, {after} after."]  # fmt: skip

    if "score" in stages:
        scored = {p.stem: json.loads(p.read_text()) for p in sorted(Path(stages["score"]["folder"]).glob("*.json"))}
        _scores_plot({v: s["score"] for v, s in scored.items()}, work / "scores.png")
        lines += ["", "## Variants", "", "![task scores](scores.png)", ""]
        lines += [
            "| variant | exact match (95 % CI) | ROUGE-L (95 % CI) | perplexity | tokens/s | TTFT ms | peak RSS MiB "
            "| size MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant, data in scored.items():
            score, figures = data["score"], data.get("evaluation") or {}
            lines.append(
                f"| {variant} | {_figure(score['exact_match'])} | {_figure(score['rouge_l'])} | "
                f"{_number(figures.get('perplexity'), '.3f')} | {_number(figures.get('decode_tokens_per_s'), '.1f')} | "
                f"{_number(figures.get('time_to_first_token_ms'), '.1f')} | "
                f"{_number(figures.get('peak_rss_bytes'), '.1f', 2**20)} | "
                f"{_number(figures.get('size_bytes'), '.1f', 2**20)} |"
            )
    path = work / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def _figure(figure: dict[str, float]) -> str:
    return f"{figure['mean']:.3f} ({figure['low']:.3f}–{figure['high']:.3f})"


def _number(value: float | None, spec: str, scale: float = 1) -> str:
    return "-" if value is None else format(value / scale, spec)


def _training_plot(curves: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for axis, (name, data) in zip(axes[0], curves.items(), strict=True):
        epochs = [e["epoch"] for e in data["epochs"]]
        axis.plot(epochs, [e["validation_loss"] for e in data["epochs"]], marker="o", label="validation")
        trained = [(e["epoch"], e["train_loss"]) for e in data["epochs"] if e["train_loss"] is not None]
        if trained:
            axis.plot(*zip(*trained, strict=True), marker="s", label="training")
        axis.set_title(name)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel("loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _scores_plot(scores: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4, 1.6 * len(scores) + 2), 3.5))
    width = 0.38
    for offset, (key, label) in enumerate((("exact_match", "exact match"), ("rouge_l", "ROUGE-L"))):
        means = [s[key]["mean"] for s in scores.values()]
        errors = [[s[key]["mean"] - s[key]["low"] for s in scores.values()],
                  [s[key]["high"] - s[key]["mean"] for s in scores.values()]]  # fmt: skip
        positions = [i + (offset - 0.5) * width for i in range(len(scores))]
        axis.bar(positions, means, width, yerr=errors, capsize=4, label=label)
    axis.set_xticks(range(len(scores)), list(scores))
    axis.set_ylim(0, 1)
    axis.set_ylabel("score (95 % interval)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
