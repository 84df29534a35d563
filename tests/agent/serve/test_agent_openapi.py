"""The agent's /openapi.json is true: schemathesis, against a live agent serving the tiny model,
finds no 5xx and no answer outside the documented statuses, content types and schemas."""

from pathlib import Path

from support import conformance_run


def test_every_answer_is_documented_and_none_is_a_server_error(start_agent, session_bundle: Path, tmp_path: Path):
    agent = start_agent(session_bundle, api_key="conformance-key", default_max_tokens=8)
    code, report = conformance_run(f"{agent.url}/openapi.json", "conformance-key", tmp_path)
    assert code == 0, report
    assert "passed" in report
