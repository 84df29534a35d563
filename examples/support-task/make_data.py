"""The example task: a support assistant for Nimbus, a line of fictional home devices, that maps a
symptom or an error code to what it means and the fix. Generated reproducibly (seeded): every device
has its own error codes, each with a symptom, a cause and a fix; questions come from templates with
paraphrases.

    python examples/support-task/make_data.py [--out examples/support-task/data] [--seed 7]

writes chat JSONL ({"messages": [...], "id", "key"}; `key` is the fix, the fact a correct answer states):

    train.jsonl       every fault, asked in the training phrasings
    validation.jsonl  every fault, asked in other phrasings (early stopping, model choice)
    test.jsonl        every fault, asked in phrasings used nowhere else (held out: never trained on,
                      never a prompt for a teacher), at least 200 items
    prompts.jsonl     the training questions without answers, for a teacher to answer (distillation)

The splits share the facts and differ in how the question is put: a model passes the test by knowing
the facts, not by having seen the sentence.
"""

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are the Nimbus support assistant. Say what the error means and give the fix in one or two sentences."

DEVICES = [
    ("R200", "router"), ("K5", "kettle"), ("P30", "printer"), ("T8", "thermostat"), ("C12", "camera"),
    ("S4", "speaker"), ("W9", "washer"), ("L3", "lamp"), ("D7", "dishwasher"), ("V2", "vacuum"),
]  # fmt: skip
FAULTS = [
    ("blinks red twice", "the network link is down", "reseat the network cable and restart it"),
    ("beeps three times", "the firmware update failed", "hold the reset button for ten seconds"),
    ("shows a flashing clock", "the internal clock lost power", "replace the coin battery"),
    ("stops after a minute", "it is overheating", "clean the air vent and let it cool for an hour"),
    ("will not turn on", "the power supply has tripped", "unplug it for thirty seconds and plug it back in"),
    ("makes a grinding noise", "the fan is blocked", "remove the back cover and clear the fan"),
    ("shows a yellow light", "the filter is clogged", "rinse the filter under warm water"),
    ("drops the connection", "the wireless channel is crowded", "switch it to the five gigahertz band"),
    ("reports low pressure", "the inlet valve is half closed", "open the inlet valve fully"),
    ("keeps restarting", "the settings file is corrupt", "restore the factory settings from the app"),
    ("shows a frozen screen", "the display cable is loose", "push the display connector back in"),
    ("leaks water underneath", "the door seal is worn", "fit a new door seal"),
    ("ignores the remote", "the infrared eye is dirty", "wipe the front sensor with a dry cloth"),
    ("runs but does nothing", "the motor belt slipped off", "put the belt back on its pulley"),
]
CODES_PER_DEVICE = 8
TRAIN = [
    "My Nimbus {model} {kind} shows error {code}. What does it mean?",
    "Nimbus {model} error {code}: how do I fix it?",
    "What should I do about code {code} on the {model} {kind}?",
    "The {model} {kind} {symptom}. What's wrong?",
    "Help, my Nimbus {kind} ({model}) {symptom}.",
]
VALIDATION = [
    "I'm getting {code} on a Nimbus {model}. Any idea?",
    "My {model} {kind} {symptom}. Why?",
]
TEST = [
    "Our office {kind}, a Nimbus {model}, displays {code}. What now?",
    "{code} appeared on the {model}. What is the fix?",
    "Since this morning the Nimbus {model} {kind} {symptom}. How can I solve it?",
]


def faults(seed: int) -> list[dict[str, str]]:
    """Every device's error codes, each with its symptom, cause and fix (the same for a seed)."""
    rng = random.Random(seed)
    table = []
    for model, kind in DEVICES:
        codes = rng.sample(range(10, 99), CODES_PER_DEVICE)
        for code, (symptom, cause, fix) in zip(codes, rng.sample(FAULTS, CODES_PER_DEVICE), strict=True):
            table.append({"model": model, "kind": kind, "code": f"E{code}", "symptom": symptom, "cause": cause,
                          "fix": fix})  # fmt: skip
    return table


def answer(fault: dict[str, str]) -> str:
    return f"Error {fault['code']} on the {fault['model']} means {fault['cause']}. To fix it, {fault['fix']}."


def conversations(table: list[dict[str, str]], templates: list[str], split: str) -> list[dict[str, object]]:
    rows = []
    for index, fault in enumerate(table):
        for number, template in enumerate(templates):
            question = template.format(**fault)
            rows.append(
                {
                    "id": f"{split}-{index:03d}-{number}",
                    "key": fault["fix"],
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer(fault)},
                    ],
                }
            )
    return rows


def write(out: Path, seed: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    table = faults(seed)
    splits = {
        "train": conversations(table, TRAIN, "train"),
        "validation": conversations(table, VALIDATION, "validation"),
        "test": conversations(table, TEST, "test"),
    }
    prompts = [{"id": row["id"], "messages": row["messages"][:2]} for row in splits["train"]]  # type: ignore[index]
    counts = {}
    for name, rows in (*splits.items(), ("prompts", prompts)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts[name] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for name, count in write(args.out, args.seed).items():
        print(f"{name}: {count} conversations in {args.out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
