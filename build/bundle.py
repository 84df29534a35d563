"""Assemble a signed bundle from an export folder.

    export folder (build.json, variants/<id>/, evaluation/<id>.json)
      ─► copy each variant's files into bundle/variants/<id>/, add inference_model.json
      ─► manifest: files with size and sha256, min memory, evaluation, source and recipe digests
      ─► sign (Ed25519) ─► optional single-file .tar

Each ONNX variant also carries `inference_model.json`, the file Foundry Local reads for a
bring-your-own model, so a Foundry Local user can load our variants as they are.
"""

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from slmops.agent.serve import chat_template
from slmops.agent.serve.qnn_runtime import CONFIG_FILE as QNN_CONFIG
from slmops.agent.serve.runtime import kv_bytes_per_token
from slmops.bundle import VARIANTS_DIR, Bundle, write_archive
from slmops.errors import BuildError
from slmops.manifest import Evaluation, FileEntry, Manifest, Source, Variant, sha256_file
from slmops.signing import load_private_key
from slmops.targets import Target, target

from .export import EVALUATION_DIR, BuildRecord

FOUNDRY_MODEL_FILE = "inference_model.json"
KV_CACHE_BUDGET_TOKENS = 2048
"""Context a device must hold in memory for the variant to be useful; sizes min_memory_bytes."""
RUNTIME_OVERHEAD_BYTES = 64 * 2**20
CONTENT = "{Content}"


def foundry_inference_model(variant_dir: Path, name: str) -> dict[str, object]:
    """Foundry Local's bring-your-own-model descriptor: a name and a prompt template."""
    template = chat_template.load(variant_dir)
    if template is None:
        raise BuildError(f"{variant_dir} has no {chat_template.TEMPLATE_FILE}; cannot describe its prompt format")
    try:
        prompt = template.render(messages=[{"role": "user", "content": CONTENT}], add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise BuildError(f"the chat template of {variant_dir} does not render: {e}") from None
    return {"Name": name, "PromptTemplate": {"assistant": CONTENT, "prompt": prompt}}


def model_shape(variant_dir: Path, t: Target) -> tuple[int, int]:
    """The variant's context length and KV cache bytes per token, from its runtime's config."""
    if t.qnn:  # the host keeps the static graph's cache in float32
        qnn = json.loads((variant_dir / QNN_CONFIG).read_text())
        decoder = {
            "num_hidden_layers": qnn["layers"],
            "num_key_value_heads": qnn["kv_heads"],
            "head_size": qnn["head_dim"],
        }
        return int(qnn["context_length"]), kv_bytes_per_token(decoder, "cpu")
    if t.openvino:
        config = json.loads((variant_dir / "config.json").read_text())
        head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        decoder = {
            "num_hidden_layers": config["num_hidden_layers"],
            "num_key_value_heads": config["num_key_value_heads"],
            "head_size": head,
        }
        return int(config["max_position_embeddings"]), kv_bytes_per_token(decoder, "openvino")
    model = json.loads((variant_dir / "genai_config.json").read_text())["model"]
    return int(model["context_length"]), kv_bytes_per_token(model["decoder"], t.execution_provider)


def min_memory_bytes(kv_token_bytes: int, size_bytes: int, evaluation: Evaluation | None) -> int:
    """Weights + a KV cache of KV_CACHE_BUDGET_TOKENS + runtime; never below the measured peak RSS."""
    estimate = size_bytes + kv_token_bytes * KV_CACHE_BUDGET_TOKENS + RUNTIME_OVERHEAD_BYTES
    measured = evaluation.peak_rss_bytes if evaluation else 0
    return max(estimate, measured)


def create(
    build_dir: Path,
    out: Path,
    name: str,
    version: str,
    description: str = "",
    key: Path | None = None,
    archive: Path | None = None,
    variant_ids: list[str] | None = None,
    force: bool = False,
) -> Bundle:
    record = BuildRecord.load(build_dir)
    chosen = variant_ids or list(record.variants)
    for variant_id in chosen:
        if variant_id not in record.variants:
            raise BuildError(f"{build_dir} has no variant {variant_id!r}; it has {', '.join(record.variants)}")
        accuracy = record.variants[variant_id].accuracy
        if accuracy is not None and not accuracy.passed:
            raise BuildError(
                f"{variant_id} failed the accuracy gate at export (perplexity {accuracy.increase:+.1%} against "
                f"the float source, bound {accuracy.max_increase:.1%}): re-export it with a better quantization, "
                "or leave it out with --variant"
            )
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    variants = [_copy_variant(build_dir, out, record, variant_id, name) for variant_id in chosen]
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime.now(UTC).replace(microsecond=0),
        description=description,
        source=Source(model=record.recipe.source, digest=record.source_digest),
        recipe_digest=record.recipe_digest,
        variants=variants,
    )
    manifest.write(out / "manifest.json")
    bundle = Bundle.open(out)
    if key is not None:
        bundle = bundle.sign(load_private_key(key))
    if archive is not None:
        write_archive(bundle, archive)
    return bundle


def _copy_variant(build_dir: Path, out: Path, record: BuildRecord, variant_id: str, name: str) -> Variant:
    t = target(variant_id)
    source_dir = build_dir / VARIANTS_DIR / variant_id
    dest = out / VARIANTS_DIR / variant_id
    shutil.copytree(source_dir, dest)
    if not (t.openvino or t.qnn):  # Foundry Local loads onnxruntime-genai folders only
        (dest / FOUNDRY_MODEL_FILE).write_text(
            json.dumps(foundry_inference_model(dest, f"{name}-{variant_id}"), indent=2) + "\n"
        )
    evaluation_path = build_dir / EVALUATION_DIR / f"{variant_id}.json"
    evaluation = Evaluation.model_validate_json(evaluation_path.read_text()) if evaluation_path.is_file() else None
    files = [
        FileEntry(path=p.relative_to(dest).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(dest.rglob("*"))
        if p.is_file()
    ]
    size = sum(f.size for f in files)
    context_length, kv_bytes = model_shape(dest, t)
    return Variant(
        id=variant_id,
        execution_provider=t.execution_provider,
        device_class=t.device_class,
        precision=t.precision,
        files=files,
        min_memory_bytes=min_memory_bytes(kv_bytes, size, evaluation),
        context_length=context_length,
        evaluation=evaluation,
        build_options=record.variants[variant_id].build_options,
        adapters=record.variants[variant_id].adapters,
    )
