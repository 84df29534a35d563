"""The bundle manifest: what a bundle holds, what each variant needs, how it measured.

`manifest.json` is the one document an agent trusts a bundle by. It is signed over
its canonical bytes (sorted keys, no whitespace, UTF-8), so any tool that rebuilds
the same model gets the same bytes to check.
"""

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.errors import ManifestInvalid, UnknownVariant, describe_validation

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
HASH_CHUNK_BYTES = 1024 * 1024

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(folder: Path) -> str:
    """One digest for a folder of files: sha256 over its sorted `path sha256` lines."""
    lines = [f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in sorted(folder.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_relative_path(path: str) -> str:
    """A path inside a bundle: relative, POSIX, no `..`, nothing a filesystem would reinterpret."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or "\x00" in path:
        raise ValueError(f"path {path!r} has an empty name, a backslash or a NUL byte")
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"path {path!r} is absolute")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise ValueError(f"path {path!r} has a '..', '.' or empty component")
    return path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(Strict):
    path: str
    """Relative to the variant's folder, POSIX separators."""
    size: int = Field(ge=0)
    sha256: Sha256Hex

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str) -> str:
        return check_relative_path(path)


class Evaluation(Strict):
    """Figures measured at build time on the build machine (see `measured_on`)."""

    perplexity: float | None = Field(default=None, gt=0)
    perplexity_tokens: int | None = Field(default=None, ge=0)
    reference_perplexity: float | None = Field(default=None, gt=0)
    """The float source's perplexity on the same text and windows (what quantization is held to)."""
    decode_tokens_per_s: float | None = Field(default=None, gt=0)
    """None where only perplexity was measured (a reference run)."""
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    peak_rss_bytes: int = Field(ge=0)
    size_bytes: int = Field(ge=0)
    new_tokens: int = Field(ge=1)
    runs: int = Field(ge=1)
    measured_on: str
    """CPU model and core count of the machine that measured."""
    runtime: str
    """Inference runtime and version, e.g. `onnxruntime-genai 0.18.0`."""

    @property
    def perplexity_increase(self) -> float | None:
        """Perplexity over the float reference's, as a fraction (0.01 = 1 % worse); None if either is missing."""
        if self.perplexity is None or self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1


ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
"""A variant's LoRA adapters lie in <variant>/adapters/<name>.onnx_adapter (onnxruntime's AdapterFormat)."""
ADAPTER_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
"""An adapter's name: its file's stem and the last part of the model name that asks for it (`bundle:name`)."""


class Adapter(Strict):
    """A LoRA adapter a variant carries beside its base graph (build/adapters.py): a request picks it by name."""

    name: str = Field(pattern=ADAPTER_NAME)
    path: str
    """Its .onnx_adapter file, relative to the variant's folder (one of the variant's files)."""
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    modules: list[str]
    """The Hugging Face modules it adapts (q_proj, ...)."""
    base_digest: Sha256Hex | None = None
    """The weights digest of the model it was trained on (its finetune.json), where known."""


class Variant(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    execution_provider: str
    device_class: Literal["npu", "gpu", "cpu"]
    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"]
    files: list[FileEntry] = Field(min_length=1)
    min_memory_bytes: int = Field(ge=0)
    context_length: int = Field(ge=1)
    evaluation: Evaluation | None = None
    build_options: dict[str, str | int | float | bool] = {}
    adapters: list[Adapter] = []

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(paths) != len(set(paths)):
            raise ValueError("a file path appears twice")
        return files

    @model_validator(mode="after")
    def _adapters_are_files(self) -> "Variant":
        names = [a.name for a in self.adapters]
        if len(names) != len(set(names)):
            raise ValueError("an adapter name appears twice")
        paths = {f.path for f in self.files}
        for adapter in self.adapters:
            if adapter.path not in paths:
                raise ValueError(f"adapter {adapter.name}'s file {adapter.path} is not one of the variant's files")
        return self

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Source(Strict):
    model: str
    """What the bundle was built from: a catalogue name, a folder or a hub id."""
    digest: Sha256Hex
    """tree_digest of the source checkpoint's files."""


class Manifest(Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=128)
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$", max_length=64)
    created: datetime
    description: str = ""
    source: Source
    recipe_digest: Sha256Hex
    """sha256 of the canonical JSON of the build recipe (targets and their options)."""
    variants: list[Variant] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_variants(self) -> "Manifest":
        ids = [v.id for v in self.variants]
        if len(ids) != len(set(ids)):
            raise ValueError("a variant id appears twice")
        return self

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise UnknownVariant(f"bundle {self.name} {self.version} has no variant {variant_id!r}")

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON. It lists every file's sha256, so it names the whole bundle."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def parse(cls, raw: bytes, origin: str = MANIFEST_FILE) -> "Manifest":
        """Parse manifest bytes, reporting every schema problem with its field."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # not JSON, nested past the parser's depth, huge integers
            raise ManifestInvalid(f"{origin} is not valid JSON: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = describe_validation(e.errors())
            raise ManifestInvalid(f"{origin} fails the manifest schema: {problems}") from None

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ManifestInvalid(f"no {path.name} in {path.parent}") from None
        return cls.parse(raw, origin=str(path))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")


def canonical_json(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
