"""The bundle registry through the REST API, on SQLite and on PostgreSQL."""

from pathlib import Path

import pytest
from sqlalchemy import inspect
from support import synthetic_bundle

from slmops.bundle import Bundle, expected_members, write_archive
from slmops.controller.store import BundleStore, hash_chunks
from slmops.messages import DEFAULT_CHUNK_BYTES

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
READER = {"Authorization": "Bearer reader-token-0123456789"}


def stored(config) -> list[str]:
    return sorted(p.name for p in (config.store_dir / "bundles").iterdir())


def test_push_registers_a_verified_bundle_once(client, archive: bytes, controller_config) -> None:
    first = client.post("/v1/bundles", content=archive, headers=ADMIN)
    assert first.status_code == 201, first.text
    summary = first.json()
    assert (summary["name"], summary["version"], summary["pushed_by"]) == ("tiny", "1.0.0", "alice")
    assert summary["variants"] == ["cpu-int4", "cpu-fp32"]
    again = client.post("/v1/bundles", content=archive, headers=ADMIN)
    assert again.status_code == 200 and again.json()["digest"] == summary["digest"]

    assert [b["digest"] for b in client.get("/v1/bundles", headers=READER).json()] == [summary["digest"]]
    detail = client.get("/v1/bundles/tiny/1.0.0", headers=READER).json()
    assert detail["manifest"]["name"] == "tiny" and len(detail["manifest"]["variants"]) == 2
    assert stored(controller_config) == [summary["digest"]]
    folder = controller_config.store_dir / "bundles" / summary["digest"]
    assert (folder / "manifest.json").is_file() and (folder / "variants" / "cpu-int4" / "genai_config.json").is_file()

    store, digest = BundleStore(controller_config.store_dir), summary["digest"]
    files = ["manifest.json", "signature.json", *expected_members(Bundle.open(folder).manifest)]
    for path in files:  # hashed on push in the agents' chunk size: sent without hashing them first
        assert store.chunk_sums(digest, path, DEFAULT_CHUNK_BYTES) == hash_chunks(folder / path, DEFAULT_CHUNK_BYTES)


def test_a_corrupted_archive_is_refused_with_the_reason_and_nothing_kept(
    client, archive: bytes, controller_config
) -> None:
    corrupted = bytearray(archive)
    corrupted[len(corrupted) // 2] ^= 0xFF  # inside model weights
    response = client.post("/v1/bundles", content=bytes(corrupted), headers=ADMIN)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_bundle" and "does not match the manifest" in error["message"]
    assert client.get("/v1/bundles", headers=ADMIN).json() == []
    assert stored(controller_config) == [] and list((controller_config.store_dir / "incoming").iterdir()) == []


def test_a_bundle_signed_by_an_unknown_key_is_refused(client, tmp_path: Path) -> None:
    from slmops.signing import generate_keypair

    stranger, _ = generate_keypair(tmp_path / "stranger")
    signed = synthetic_bundle(tmp_path / "bundle", stranger)
    archive = write_archive(signed, tmp_path / "stranger.tar").read_bytes()
    response = client.post("/v1/bundles", content=archive, headers=ADMIN)
    assert response.status_code == 422 and response.json()["error"]["code"] == "SignatureError"


def tar_of(*members: tuple[str, bytes | None]) -> bytes:
    """An archive of these members (None: a folder), as a hostile client would make it."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    ("archive_bytes", "reason"),
    [  # issue 12's hostile run: each of these answered 500
        (tar_of(("manifest.json", b"[" * 10_000 + b"]" * 10_000)), "is not valid JSON"),
        (tar_of(("manifest.json", b'{"schema_version": ' + b"9" * 5000 + b"}")), "is not valid JSON"),
        (tar_of(("manifest.json", None)), "is a folder; it must be a file"),
    ],
    ids=["nested-10000-deep", "a-5000-digit-integer", "manifest-is-a-folder"],
)
def test_a_hostile_manifest_is_refused_with_the_reason(client, archive_bytes: bytes, reason: str) -> None:
    response = client.post("/v1/bundles", content=archive_bytes, headers=ADMIN)
    assert response.status_code == 422 and reason in response.json()["error"]["message"], response.text


def test_client_mistakes_outside_the_bundles_are_4xx_in_the_one_error_shape(client, archive: bytes) -> None:
    digest = client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    for response, status in (
        (client.get("/v1/audit?limit=99999999999999999999", headers=ADMIN), 400),  # was SQLite's OverflowError
        (client.get("/v1/audit?limit=0", headers=ADMIN), 400),
        (client.get(f"/v1/store/{digest}/manifest.json%00.txt", headers=ADMIN), 404),  # was a 500
        (client.get("/v1/nowhere", headers=ADMIN), 404),
        (client.put("/v1/bundles", headers=ADMIN), 405),
    ):
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_not_an_archive_at_all(client) -> None:
    response = client.post("/v1/bundles", content=b'{"hello": "world"}', headers=ADMIN)
    assert response.status_code == 422 and "corrupt or truncated" in response.json()["error"]["message"]


def test_versions_are_immutable_and_a_refused_push_stores_nothing(
    client, archive: bytes, tmp_path: Path, signing_key, controller_config
) -> None:
    digest = client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    other = synthetic_bundle(tmp_path / "other", signing_key[0], description="other content")
    response = client.post("/v1/bundles", content=write_archive(other, tmp_path / "o.tar").read_bytes(), headers=ADMIN)
    assert response.status_code == 409 and "versions are immutable" in response.json()["error"]["message"]
    # Issue 11, finding 9: the refused content used to land in the store and be served from it.
    assert stored(controller_config) == [digest]
    assert sorted(p.name for p in (controller_config.store_dir / "chunk-sums").iterdir()) == [digest]
    assert list((controller_config.store_dir / "incoming").iterdir()) == []
    assert client.get(f"/v1/store/{other.manifest.digest}/manifest.json", headers=ADMIN).status_code == 404


def test_a_restart_removes_what_an_interrupted_push_left(client, archive: bytes, controller_config) -> None:
    from fastapi.testclient import TestClient

    from slmops.controller.service import build_app

    digest = client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    store = controller_config.store_dir
    (store / "incoming" / "5f0e1d").mkdir()  # a kill -9 during the push: the staging folder stays
    (store / "incoming" / "5f0e1d" / "manifest.json").write_text("{}")
    (store / "incoming" / ".5f0e1d.half").write_bytes(b"x" * 100)
    (store / "bundles" / ("9" * 64)).mkdir()  # stored, but its registry row never committed
    with TestClient(build_app(controller_config)):
        assert list((store / "incoming").iterdir()) == []
        assert stored(controller_config) == [digest]


def test_roles_and_tokens(client, archive: bytes) -> None:
    assert client.get("/v1/bundles").status_code == 401
    bare = {"Authorization": ADMIN["Authorization"].removeprefix("Bearer ")}
    assert client.get("/v1/bundles", headers=bare).status_code == 401  # was accepted without "Bearer "
    assert client.get("/v1/bundles", headers={"Authorization": "Bearer nope"}).status_code == 401
    refused = client.post("/v1/bundles", content=archive, headers=READER)
    assert refused.status_code == 403 and "reader" in refused.json()["error"]["message"]
    assert client.get("/v1/audit", headers=READER).status_code == 403
    assert client.get("/v1/bundles", headers=READER).status_code == 200


def test_delete_removes_the_files_and_every_change_is_audited(client, archive: bytes, controller_config) -> None:
    digest = client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    assert client.delete("/v1/bundles/tiny/1.0.0", headers=READER).status_code == 403
    assert client.delete("/v1/bundles/tiny/1.0.0", headers=ADMIN).status_code == 204
    assert client.get("/v1/bundles/tiny/1.0.0", headers=ADMIN).status_code == 404
    assert client.delete("/v1/bundles/tiny/1.0.0", headers=ADMIN).status_code == 404
    assert stored(controller_config) == []
    assert not (controller_config.store_dir / "chunk-sums" / digest).exists()
    audit = client.get("/v1/audit", headers=ADMIN).json()
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("alice", "bundle.delete", "tiny:1.0.0"),
        ("alice", "bundle.push", "tiny:1.0.0"),
    ]
    assert all(a["detail"]["digest"] == digest for a in audit)


def test_migrations_build_the_schema_the_models_describe(controller_config) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from slmops.controller.db import Base, open_database

    engine = open_database(controller_config.database)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert {"bundle", "audit", "alembic_version"} <= set(inspect(engine).get_table_names())
        open_database(controller_config.database).dispose()  # migrating again is a no-op
    finally:
        engine.dispose()


def test_the_store_serves_a_bundle_files_with_ranges_and_nothing_outside_it(client, archive: bytes) -> None:
    digest = client.post("/v1/bundles", content=archive, headers=ADMIN).json()["digest"]
    manifest = client.get(f"/v1/store/{digest}/manifest.json", headers=READER)
    assert manifest.status_code == 200 and manifest.json()["name"] == "tiny"
    tail = client.get(f"/v1/store/{digest}/manifest.json", headers={**READER, "Range": "bytes=10-"})
    assert tail.status_code == 206 and tail.content == manifest.content[10:]
    for path in ("../../admin.token", "variants", "nothing.json", "%2e%2e/%2e%2e/admin.token"):
        assert client.get(f"/v1/store/{digest}/{path}", headers=READER).status_code == 404, path
    assert client.get(f"/v1/store/..%2f{digest}/manifest.json", headers=READER).status_code == 404
    assert client.get(f"/v1/store/{digest}/manifest.json").status_code == 401


def test_devices_born_before_the_hardware_class_column_get_theirs(controller_config) -> None:
    """Migration 0009 fills the new column from each device's stored profile."""
    import json
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, text

    from slmops.controller.db import migrate
    from slmops.controller.rollout_plan import hardware_class

    profile = {"cpu_model": "Cortex-A76", "memory_total_bytes": 8 << 30,
               "accelerators": [{"provider": "cpu"}, {"provider": "cuda"}]}  # fmt: skip
    engine = create_engine(controller_config.database_url)
    try:
        migrate(engine, "0008")
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO device (id, first_seen, last_seen, online, agent_version, profile, tags, groups) "
                     "VALUES ('old', :now, :now, false, '', :profile, '{}', '[]'), "
                     "('unborn', :now, :now, false, '', '{}', '{}', '[]')"),
                {"now": datetime.now(UTC), "profile": json.dumps(profile)},
            )  # fmt: skip
        migrate(engine)
        with engine.connect() as connection:
            rows = dict(connection.execute(text("SELECT id, hardware_class FROM device")).all())
        assert rows == {"old": hardware_class(profile), "unborn": ""}
        assert rows["old"].startswith("cuda · 8+ GiB")
    finally:
        engine.dispose()
