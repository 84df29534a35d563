"""The command line as users call it: help everywhere, exit codes, JSON output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops.cli import app

runner = CliRunner()

COMMANDS = [
    [],
    ["bundle"],
    ["bundle", "create"],
    ["bundle", "inspect"],
    ["bundle", "verify"],
    ["bundle", "sign"],
    ["bundle", "keygen"],
    ["bundle", "unpack"],
    ["bundle", "push"],
    ["build"],
    ["build", "model"],
    ["build", "model", "fetch"],
    ["build", "model", "tiny"],
    ["build", "export"],
    ["build", "evaluate"],
    ["build", "targets"],
    ["agent"],
    ["agent", "chat"],
    ["agent", "probe"],
    ["agent", "choose"],
    ["agent", "serve"],
    ["agent", "run"],
    ["agent", "telemetry"],
    ["controller"],
    ["controller", "serve"],
    ["fleet"],
    ["fleet", "devices"],
    ["fleet", "label"],
    ["fleet", "desire"],
    ["fleet", "rollout"],
    ["fleet", "rollout", "create"],
    ["fleet", "rollout", "list"],
    ["fleet", "rollout", "status"],
    ["fleet", "rollout", "pause"],
    ["fleet", "rollout", "resume"],
    ["fleet", "rollout", "abort"],
    ["fleet", "rollout", "rollback"],
    ["fleet", "rollout", "promote"],
    ["fleet", "simulate"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "slmops")
def test_every_command_has_useful_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: {' '.join(['slmops', *command])} [OPTIONS]" in result.output, "the help of the command asked for"
    assert len(result.output.split()) > 20


def test_verify_ok_and_json(session_bundle: Path, signing_key) -> None:
    result = runner.invoke(app, ["bundle", "verify", str(session_bundle), "-k", str(signing_key[1]), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"ok": True, "name": "tiny", "version": "1.0.0"}


def test_verify_failure_exits_1_with_the_reason(bundle_dir: Path, signing_key) -> None:
    (bundle_dir / "variants" / "cpu-int4" / "genai_config.json").write_text("{}")
    result = runner.invoke(app, ["bundle", "verify", str(bundle_dir), "-k", str(signing_key[1]), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["kind"] == "BundleFilesError" and "genai_config.json" in report["error"]


def test_inspect_json_is_the_manifest(session_bundle: Path) -> None:
    result = runner.invoke(app, ["bundle", "inspect", str(session_bundle), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["name"] == "tiny"


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables printed at 300 columns: the console is made at import, when COLUMNS may say 80 (xdist's workers)."""
    from slmops.terminal import console

    monkeypatch.setattr(console, "_width", 300)


def test_inspect_table_shows_variants(session_bundle: Path, wide_console: None) -> None:
    result = runner.invoke(app, ["bundle", "inspect", str(session_bundle)])
    assert result.exit_code == 0
    assert "cpu-int4" in result.output and "cpu-fp32" in result.output and "signed by key" in result.output


def test_targets_table_marks_npu_requirements(wide_console: None) -> None:
    result = runner.invoke(app, ["build", "targets"])
    assert result.exit_code == 0
    assert "qnn-npu" in result.output and "slmops (QNN)" in result.output
    assert "openvino-npu" in result.output and "slmops (OpenVINO IR)" in result.output
    for method in ("imatrix", "imatrix-asym", "k-quant-mixed", "rtn"):  # and what each --quant costs
        assert f"│ {method} " in result.output


def test_export_with_unknown_target_exits_2_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", "export", str(tiny_model), "-t", "tpu-int2", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown target 'tpu-int2'" in result.output


def test_failed_gate_exits_3_naming_figure_and_bound(tiny_export: Path) -> None:
    """Run as a real process: evaluation spawns a child and must work from the installed command."""
    slmops = Path(sys.executable).with_name("slmops")
    result = subprocess.run(
        [
            str(slmops),
            "build",
            "evaluate",
            str(tiny_export / "variants" / "cpu-int4"),
            "--runs",
            "1",
            "--new-tokens",
            "4",
            "--min-tokens-per-s",
            "1e12",
            "--output",
            str(tiny_export / "gate.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "decode speed" in result.stderr and "below the bound 1e+12" in result.stderr
    assert json.loads((tiny_export / "gate.json").read_text())["decode_tokens_per_s"] > 0


def test_ppl_gate_outside_an_export_folder_needs_a_reference(tiny_export: Path, tmp_path: Path) -> None:
    variant = tmp_path / "cpu-int4"
    shutil.copytree(tiny_export / "variants" / "cpu-int4", variant)
    result = runner.invoke(app, ["build", "evaluate", str(variant), "--max-ppl-increase", "15%"])
    assert result.exit_code == 2 and "--reference" in result.output


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    assert runner.invoke(app, ["bundle", "keygen", str(tmp_path / "k")]).exit_code == 0
    again = runner.invoke(app, ["bundle", "keygen", str(tmp_path / "k")])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output


def test_sign_then_verify_with_the_new_key(bundle_dir: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["bundle", "keygen", str(tmp_path / "new")])
    assert runner.invoke(app, ["bundle", "sign", str(bundle_dir), "--key", str(tmp_path / "new.key")]).exit_code == 0
    assert runner.invoke(app, ["bundle", "verify", str(bundle_dir), "-k", str(tmp_path / "new.pub")]).exit_code == 0


def test_unpack_then_chat(session_bundle: Path, signing_key, tmp_path: Path) -> None:
    from slmops.bundle import Bundle, write_archive

    archive = write_archive(Bundle.open(session_bundle), tmp_path / "b.tar")
    dest = tmp_path / "unpacked"
    assert runner.invoke(app, ["bundle", "unpack", str(archive), str(dest), "-k", str(signing_key[1])]).exit_code == 0
    result = runner.invoke(app, ["agent", "chat", str(dest), "Hello", "-k", str(signing_key[1]), "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_chat_refuses_a_tampered_bundle(bundle_dir: Path, signing_key) -> None:
    (bundle_dir / "variants" / "cpu-int4" / "chat_template.jinja").write_text("{{ evil }}")
    result = runner.invoke(app, ["agent", "chat", str(bundle_dir), "Hello", "-k", str(signing_key[1])])
    assert result.exit_code == 1 and "chat_template.jinja" in result.output


def test_probe_json_describes_this_machine() -> None:
    result = runner.invoke(app, ["agent", "probe", "--json"])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)
    assert profile["cpu_cores_logical"] >= 1 and profile["memory_total_bytes"] > profile["memory_available_bytes"] > 0
    assert "cpu" in [a["provider"] for a in profile["accelerators"]]
    table = runner.invoke(app, ["agent", "probe"])
    assert table.exit_code == 0 and profile["cpu_model"][:20] in table.output


def test_choose_explains_each_variant(session_bundle: Path) -> None:
    table = runner.invoke(app, ["agent", "choose", str(session_bundle)])
    assert table.exit_code == 0 and "chosen" in table.output, table.output
    result = runner.invoke(app, ["agent", "choose", str(session_bundle), "--json"])
    assert json.loads(result.stdout) == [
        {"variant": "cpu-int4", "provider": "cpu", "usable": True, "reason": "chosen"},
        {"variant": "cpu-fp32", "provider": "cpu", "usable": True, "reason": "fallback #1: ranked after cpu-int4"},
    ]
    forbidden = runner.invoke(
        app, ["agent", "choose", str(session_bundle), "--json"], env={"SLMOPS_AGENT_FORBID_PROVIDERS": '["cpu"]'}
    )
    assert forbidden.exit_code == 1
    assert {d["reason"] for d in json.loads(forbidden.stdout)} == {"provider cpu is forbidden by the configuration"}


def test_an_agent_command_loads_only_its_own_area() -> None:
    """`slmops agent ...` on a device imports neither the build pipeline nor numpy (14 MiB of an idle
    agent's RSS when the root command mounted every area up front)."""
    script = (
        "import sys\n"
        "from slmops.cli import main\n"
        "sys.argv = ['slmops', 'agent', 'probe', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy' or m.startswith('slmops.build')))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, check=True)
    assert "probe" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
