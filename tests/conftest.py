"""Shared fixtures: one tiny model and one export per session, fresh bundles per test.

SLMOPS_HOME points into the checkout (.slmops-test-home, git-ignored) so tests never
touch the user's folder, and materialized models are reused between local runs.
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Mosquitto, create_database, postgres_server

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = REPO / ".slmops-test-home"
os.environ["SLMOPS_HOME"] = str(TEST_HOME)


REAL_MODEL_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the real model may take longer than the 120 s default: the first pays for
    materializing and exporting SmolLM2 on a fresh clone."""
    for item in items:
        if item.get_closest_marker("real_model") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(REAL_MODEL_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Made once in the test home; `make test`'s workers (pytest-xdist) take turns, the second finds it made."""
    from filelock import FileLock

    from slmops.build import models

    path = TEST_HOME / "tiny-model"
    TEST_HOME.mkdir(exist_ok=True)
    with FileLock(TEST_HOME / ".tiny-model.lock"):
        if not (path / models.SOURCE_RECORD).is_file():
            shutil.rmtree(path, ignore_errors=True)
            models.make_tiny(path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder with cpu-int4 and cpu-fp32 variants of the tiny model, cpu-int4 evaluated."""
    from slmops.build import evaluate
    from slmops.build.export import Recipe, evaluation_path, export, with_reference

    out = tmp_path_factory.mktemp("tiny-export")
    export(Recipe(source=str(tiny_model), targets=["cpu-int4", "cpu-fp32"]), out, force=True)
    variant = out / "variants" / "cpu-int4"
    record = evaluation_path(variant)
    assert record is not None
    evaluate.save(with_reference(evaluate.evaluate(variant, runs=1, new_tokens=8), variant), record)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two peft LoRA adapters of the tiny model with random weights (so each changes the answers): `terse`
    on every linear (r 8), `verbose` on q, v and down (r 4)."""
    from support import lora_adapter

    folder = tmp_path_factory.mktemp("adapters")
    return {
        "terse": lora_adapter(tiny_model, folder / "terse", seed=1, rank=8, targets="all-linear"),
        "verbose": lora_adapter(
            tiny_model, folder / "verbose", seed=2, rank=4, targets=["q_proj", "v_proj", "down_proj"]
        ),
    }


@pytest.fixture(scope="session")
def adapter_export(tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's cpu-int4 and cpu-fp32 variants, each carrying both adapters."""
    from slmops.build.export import Recipe, export

    out = tmp_path_factory.mktemp("adapter-export")
    adapters = {name: str(path) for name, path in tiny_adapters.items()}
    export(Recipe(source=str(tiny_model), targets=["cpu-int4", "cpu-fp32"], adapters=adapters), out, force=True)
    return out


@pytest.fixture(scope="session")
def adapter_bundle(
    adapter_export: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from slmops.build.bundle import create

    out = tmp_path_factory.mktemp("adapter-bundle") / "tiny"
    create(adapter_export, out, name="tiny", version="1.0.0", key=signing_key[0], variant_ids=["cpu-int4"])
    return out


@pytest.fixture(scope="session")
def openvino_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder with the tiny model's openvino-cpu and openvino-npu variants."""
    from slmops.build.export import Recipe, export

    out = tmp_path_factory.mktemp("tiny-openvino")
    export(Recipe(source=str(tiny_model), targets=["openvino-cpu", "openvino-npu"]), out, force=True)
    return out


@pytest.fixture(scope="session")
def openvino_bundle(
    openvino_export: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from slmops.build.bundle import create

    out = tmp_path_factory.mktemp("openvino-bundle") / "tiny-openvino"
    create(openvino_export, out, name="tiny-openvino", version="1.0.0", key=signing_key[0])
    return out


@pytest.fixture(scope="session")
def qnn_bundle(tiny_model: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's qnn-npu variant, signed (it runs here on onnxruntime-qnn's HTP simulator)."""
    from slmops.build.bundle import create
    from slmops.build.export import Recipe, export

    build = tmp_path_factory.mktemp("tiny-qnn")
    export(Recipe(source=str(tiny_model), targets=["qnn-npu"]), build, force=True)
    out = tmp_path_factory.mktemp("qnn-bundle") / "tiny-qnn"
    create(build, out, name="tiny-qnn", version="1.0.0", key=signing_key[0])
    return out


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from slmops.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "release")


@pytest.fixture(scope="session")
def session_bundle(tiny_export: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmops.build.bundle import create

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    create(tiny_export, out, name="tiny", version="1.0.0", key=signing_key[0])
    return out


@pytest.fixture
def bundle_dir(session_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the signed tiny bundle, free to tamper with."""
    copy = tmp_path / "bundle"
    shutil.copytree(session_bundle, copy)
    return copy


@pytest.fixture
def trusted(signing_key: tuple[Path, Path]) -> list:
    from slmops.signing import trusted_keys

    return trusted_keys([signing_key[1]])


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The real SmolLM2-135M-Instruct exported to cpu-int4 (about 30 s), once per run: `make test`'s workers
    share it (the run's own temporary folder; the first makes it under a lock), its users only read it."""
    from filelock import FileLock

    from slmops.build.export import Recipe, export

    # under xdist, the run's folder above each worker's: shared by this run's workers, and by nothing else
    run = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, done = run / "smollm2-export", run / "smollm2-export.done"
    with FileLock(run / "smollm2-export.lock"):
        if not done.is_file():
            export(Recipe(source="smollm2-135m-instruct", targets=["cpu-int4"]), out, force=True)
            done.touch()
    return out


@pytest.fixture(scope="session")
def smollm2_bundle(
    smollm2_export: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from slmops.build.bundle import create

    out = tmp_path_factory.mktemp("smollm2-bundle") / "smollm2-135m-instruct"
    create(smollm2_export, out, name="smollm2-135m-instruct", version="1.0.0", key=signing_key[0])
    return out


@pytest.fixture
def broker(tmp_path: Path):
    server = Mosquitto(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def mosquitto(broker: Mosquitto) -> int:
    """The port of a running Mosquitto of our own."""
    return broker.port


@pytest.fixture
def publisher(mosquitto: int):
    """A plain paho client of the test's Mosquitto (anonymous: no ACL), connected and looping."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect("127.0.0.1", mosquitto)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


# --- PostgreSQL ----------------------------------------------------------------------------
# This machine's PostgreSQL binaries on a free port with a data folder of our own (initdb),
# never the system's instance.


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A running PostgreSQL server of our own; yields its base URL (no database name)."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_database(postgres: str) -> str:
    """A fresh, empty database on the test PostgreSQL server; its SQLAlchemy URL."""
    return create_database(postgres)
