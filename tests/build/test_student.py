"""Layer-subset students (slmops.build.student) on a tiny 6-layer model: block influence, the layers
chosen (first two and last always), the right layers copied and re-indexed, and a student that reloads,
generates and exports."""

import json
from pathlib import Path

import pytest

from slmops.build.student import choose_layers, make_student
from slmops.errors import BuildError

TEXTS = ["The K2 kettle shows E7: run the descale cycle.", "Error E41 on the R200 means the uplink is down."]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmops.build import models

    return models.make_tiny(tmp_path_factory.mktemp("six") / "model", layers=6, seed=3)


def test_the_first_two_and_the_last_stay_and_the_most_influential_of_the_rest() -> None:
    influence = [0.9, 0.1, 0.5, 0.05, 0.7, 0.2, 0.3, 0.01]
    assert choose_layers(influence, 5) == [0, 1, 2, 4, 7]
    assert choose_layers(influence, 3) == [0, 1, 7]
    with pytest.raises(BuildError, match="at least 3"):
        choose_layers(influence, 2)


def test_a_student_keeps_the_chosen_layers_weights_and_reloads(six_layers: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    record = make_student(str(six_layers), tmp_path / "s", layers=[0, 1, 3, 5])
    teacher = AutoModelForCausalLM.from_pretrained(six_layers, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 4 and record["layers"] == [0, 1, 3, 5]
    for new, old in enumerate([0, 1, 3, 5]):
        assert student.model.layers[new].self_attn.layer_idx == new
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    generated = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)  # its cache works
    assert generated.shape == (1, 7)
    assert json.loads((tmp_path / "s" / "student.json").read_text())["teacher_layers"] == 6


def test_layers_chosen_by_influence_and_bad_lists_refused(six_layers: Path, tmp_path: Path) -> None:
    record = make_student(str(six_layers), tmp_path / "s", keep=4, calibration=TEXTS)
    assert len(record["influence"]) == 6 and all(0 <= i <= 2 for i in record["influence"])
    assert record["layers"] == choose_layers(record["influence"], 4) and record["layers"][:2] == [0, 1]
    with pytest.raises(BuildError, match="distinct layer numbers"):
        make_student(str(six_layers), tmp_path / "bad", layers=[0, 7])
    with pytest.raises(BuildError, match="calibration"):
        make_student(str(six_layers), tmp_path / "bad2", keep=4)


def test_a_student_exports_to_onnx(six_layers: Path, tmp_path: Path) -> None:
    from slmops.build.export import Recipe, export

    make_student(str(six_layers), tmp_path / "s", layers=[0, 1, 5])
    export(Recipe(source=str(tmp_path / "s"), targets=["cpu-fp32"]), tmp_path / "export", force=True)
    assert (tmp_path / "export" / "variants" / "cpu-fp32" / "genai_config.json").is_file()
