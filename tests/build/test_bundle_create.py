"""Bundle assembly: manifest contents, Foundry Local descriptor, provenance."""

import json
from pathlib import Path

import pytest

from slmops.build.bundle import create
from slmops.build.export import BuildRecord
from slmops.bundle import Bundle, verify_archive
from slmops.manifest import sha256_file


def test_manifest_lists_every_file_with_size_and_digest(session_bundle: Path) -> None:
    bundle = Bundle.open(session_bundle)
    for variant in bundle.manifest.variants:
        folder = bundle.variant_dir(variant.id)
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk == {f.path for f in variant.files}
        for entry in variant.files:
            assert entry.size == (folder / entry.path).stat().st_size
            assert entry.sha256 == sha256_file(folder / entry.path)


def test_manifest_carries_provenance_and_figures(session_bundle: Path, tiny_export: Path) -> None:
    manifest = Bundle.open(session_bundle).manifest
    record = BuildRecord.load(tiny_export)
    assert manifest.source.digest == record.source_digest
    assert manifest.recipe_digest == record.recipe_digest
    int4, fp32 = manifest.variant("cpu-int4"), manifest.variant("cpu-fp32")
    assert (int4.execution_provider, int4.device_class, int4.precision) == ("cpu", "cpu", "int4")
    assert int4.evaluation is not None and int4.evaluation.decode_tokens_per_s > 0
    # export scores perplexity only; speed was not measured for fp32: absent, not invented
    assert fp32.evaluation is not None and fp32.evaluation.perplexity_increase == pytest.approx(0, abs=1e-5)
    assert fp32.evaluation.decode_tokens_per_s is None
    assert int4.min_memory_bytes >= int4.evaluation.peak_rss_bytes
    assert int4.min_memory_bytes > int4.size_bytes
    assert int4.build_options["block_size"] == 32


def test_each_variant_carries_a_foundry_local_descriptor(session_bundle: Path) -> None:
    descriptor = json.loads((session_bundle / "variants" / "cpu-int4" / "inference_model.json").read_text())
    assert descriptor["Name"] == "tiny-cpu-int4"
    template = descriptor["PromptTemplate"]
    assert template["assistant"] == "{Content}"
    assert template["prompt"].endswith("<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n")


def test_create_with_archive_and_variant_subset(tiny_export: Path, signing_key, tmp_path: Path, trusted: list) -> None:
    archive = tmp_path / "b.tar"
    bundle = create(
        tiny_export,
        tmp_path / "b",
        "tiny",
        "2.0.0",
        key=signing_key[0],
        archive=archive,
        variant_ids=["cpu-int4"],
    )
    assert [v.id for v in bundle.manifest.variants] == ["cpu-int4"]
    assert verify_archive(archive, trusted).version == "2.0.0"


def test_unknown_variant_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    from slmops.errors import SlmopsError

    with pytest.raises(SlmopsError, match="no variant 'cuda-fp16'"):
        create(tiny_export, tmp_path / "b", "tiny", "1", variant_ids=["cuda-fp16"])


def test_unsigned_bundle_is_created_without_a_key(tiny_export: Path, tmp_path: Path) -> None:
    assert create(tiny_export, tmp_path / "b", "tiny", "1").signature is None
