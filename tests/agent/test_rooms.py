"""agent/serve/ and agent/fleet/ never import each other (the fleet drives the model through agent/host.py)."""

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"


def imported(path: Path) -> set[str]:
    """The agent-relative modules `path` imports ("serve.engine", "host", ...)."""
    room = path.parent.relative_to(AGENT).parts
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(room[: len(room) - (node.level - 1)])
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names |= {module} if node.module else {".".join([*base, a.name]) for a in node.names}
            elif node.module and node.module.startswith("slmops.agent."):
                names.add(node.module.removeprefix("slmops.agent."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("slmops.agent.") for a in node.names if a.name.startswith("slmops.agent.")}
    return names


@pytest.mark.parametrize(("room", "other"), [("serve", "fleet"), ("fleet", "serve")])
def test_a_room_does_not_import_the_other(room: str, other: str) -> None:
    for path in (AGENT / room).glob("*.py"):
        crossing = sorted(name for name in imported(path) if name == other or name.startswith(f"{other}."))
        assert not crossing, f"agent/{room}/{path.name} imports {crossing}"
