"""Agent configuration: defaults, TOML, environment, flags, and errors that name the key."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops.agent import config as agent_config
from slmops.cli import app


def test_defaults_work_out_of_the_box() -> None:
    config = agent_config.load()
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8765, None)
    assert config.max_active_requests >= 1 and config.telemetry_db.name == "telemetry.sqlite"


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('port = 9000\nhost = "0.0.0.0"\nmax_active_requests = 2\nforbid_providers = ["qnn"]\n')
    monkeypatch.setenv("SLMOPS_AGENT_PORT", "9100")
    monkeypatch.setenv("SLMOPS_AGENT_MAX_ACTIVE_REQUESTS", "3")
    config = agent_config.load(file, port=9200)
    assert (config.port, config.max_active_requests, config.host) == (9200, 3, "0.0.0.0")
    assert config.forbid_providers == ["qnn"]


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("port = 70000", "port"),
        ("threads = 0", "threads"),
        ('max_active_requests = "many"', "max_active_requests"),
        ("telemetry_interval_s = -1", "telemetry_interval_s"),
        ('prefer_providers = ["gpu9000"]', "prefer_providers.0"),
        ("colour = 'blue'", "colour"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, toml: str, named: str) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(toml + "\n")
    with pytest.raises(agent_config.ConfigError, match=rf"in {file}: {named}: "):
        agent_config.load(file)


def test_bad_environment_values_are_named_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_AGENT_PORT", "eighty")
    with pytest.raises(agent_config.ConfigError, match="port: "):
        agent_config.load()


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(agent_config.ConfigError, match="does not exist"):
        agent_config.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(agent_config.ConfigError, match="is not valid TOML"):
        agent_config.load(broken)


def test_serve_with_a_bad_config_stops_before_starting(tmp_path: Path, session_bundle: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text("max_queued_requests = -5\n")
    result = CliRunner().invoke(app, ["agent", "serve", str(session_bundle), "--config", str(file)])
    assert result.exit_code == 2
    assert "max_queued_requests" in result.output


def test_serve_on_a_taken_port_says_so(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["agent", "serve", "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
