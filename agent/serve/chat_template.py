"""A variant's chat template (chat_template.jinja) as transformers renders it: jinja2's immutable
sandbox with trim_blocks and lstrip_blocks, `raise_exception`, and the bos and eos tokens of the
variant's tokenizer_config.json. The qnn runtime prompts with it; bundles describe the prompt
format with it (Foundry Local's inference_model.json)."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

TEMPLATE_FILE = "chat_template.jinja"


def load(variant_dir: Path) -> "jinja2.Template | None":
    """The template, or None where the variant has none. Rendering raises jinja2.TemplateError
    where the template refuses its input (raise_exception) or breaks the sandbox."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = variant_dir / TEMPLATE_FILE
    if not path.is_file():
        return None
    tokenizer_config = json.loads((variant_dir / "tokenizer_config.json").read_text())

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(
        path.read_text(),
        globals={
            "bos_token": tokenizer_config.get("bos_token", ""),
            "eos_token": tokenizer_config.get("eos_token", ""),
        },
    )
