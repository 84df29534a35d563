"""The agent must run where torch, transformers, peft and Olive are not installed."""

import subprocess
import sys
from pathlib import Path

BLOCKER = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'peft', 'olive', 'accelerate'}:
            raise ImportError(f'{name} is not installed on this device')
sys.meta_path.insert(0, Refuse())
"""


def test_agent_chats_without_ml_frameworks(session_bundle: Path, signing_key) -> None:
    argv = ["slmops", "agent", "chat", str(session_bundle), "Hello", "-k", str(signing_key[1]), "--max-tokens", "3"]
    script = BLOCKER + f"sys.argv = {argv!r}\nfrom slmops.cli import main\nmain()\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr


def test_agent_modules_import_without_ml_frameworks() -> None:
    script = BLOCKER + "import slmops, slmops.cli, slmops.agent.runtime, slmops.agent.cli, slmops.bundle\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
