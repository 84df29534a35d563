"""Bundle files over HTTP from the store of conftest.py, which answers as the controller's does."""

import hashlib
import os
from pathlib import Path

import pytest
from bundle_store import STORE_TOKEN as TOKEN
from bundle_store import Store

from slmops.agent.fleet.sync import HttpSource
from slmops.agent.fleet.transfer import Wanted
from slmops.errors import SyncError, TransferError

DIGEST = "ab" * 32


@pytest.fixture
def served(store: Store, tmp_path: Path) -> tuple[str, Path, Store]:
    """(URL, the store's folder for DIGEST, the store)."""
    folder = tmp_path / "store"
    folder.mkdir()
    store.folders[DIGEST] = folder
    return store.url, folder, store


def ranges(store: Store) -> list[str]:
    """The Range header of each request the store answered."""
    return [header for _, header in store.requests]


def wanted(target: Path, data: bytes) -> Wanted:
    return Wanted(target, hashlib.sha256(data).hexdigest(), len(data))


def test_a_file_arrives_whole_and_a_partial_one_resumes_with_a_range(served, tmp_path: Path) -> None:
    url, folder, store = served
    data = os.urandom(3 << 20)
    (folder / "weights.bin").write_bytes(data)
    target = tmp_path / "out" / "weights.bin"
    progress: list[int] = []
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"weights.bin": wanted(target, data)}, progress.append)
    assert target.read_bytes() == data and sum(progress) == len(data) and ranges(store) == [""]

    target.write_bytes(data[: 1 << 20])  # a download cut short
    assert HttpSource(url, TOKEN, DIGEST).on_disk(target, len(data)) == 1 << 20
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"weights.bin": wanted(target, data)}, None)
    assert target.read_bytes() == data and ranges(store)[-1] == f"bytes={1 << 20}-"


def test_what_is_on_disk_past_the_end_starts_over(served, tmp_path: Path) -> None:
    url, folder, store = served
    data = os.urandom(10_000)
    (folder / "small.bin").write_bytes(data)
    target = tmp_path / "small.bin"
    target.write_bytes(os.urandom(20_000))  # longer than the file: the server answers 416
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"small.bin": wanted(target, data)}, None)
    assert target.read_bytes() == data and ranges(store) == ["bytes=20000-", ""]


@pytest.mark.parametrize("wrong", ["other bytes", "more bytes than the manifest says"])
def test_a_file_served_wrong_is_refused_and_not_kept(served, tmp_path: Path, wrong: str) -> None:
    url, folder, _ = served
    data = os.urandom(2 << 20)
    expected = wanted(tmp_path / "out.bin", data)
    if wrong == "other bytes":
        (folder / "f.bin").write_bytes(os.urandom(len(data)))
    else:
        (folder / "f.bin").write_bytes(data + os.urandom(3 << 20))
    with (
        pytest.raises(TransferError, match="does not match the manifest's sha256"),
        HttpSource(url, TOKEN, DIGEST) as s,
    ):
        s.fetch({"f.bin": expected}, None)
    assert not expected.target.exists()


def test_a_missing_file_or_a_wrong_token_is_a_clear_error(served, tmp_path: Path) -> None:
    url, _, _ = served
    missing = Wanted(tmp_path / "nothing", None, None)
    with pytest.raises(SyncError, match="download of nothing answered 404"), HttpSource(url, TOKEN, DIGEST) as s:
        s.fetch({"nothing": missing}, None)
    with pytest.raises(SyncError, match="answered 401"), HttpSource(url, "wrong", DIGEST) as s:
        s.fetch({"nothing": missing}, None)
