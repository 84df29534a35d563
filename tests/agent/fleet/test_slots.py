"""The A/B slots: which slot is served, which is kept to roll back to, and what is dropped."""

from pathlib import Path

from slmops.agent.fleet.slots import Slot, Slots


def slot(digest: str) -> Slot:
    return Slot(digest=digest * 64, variant="cpu-int4", bundle="tiny", version=f"{digest}.0.0")


def make(slots: Slots, *digests: str) -> None:
    for digest in digests:
        slots.path(digest * 64).mkdir(parents=True)


def test_the_previous_slot_is_kept_and_older_ones_dropped(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    slots.partial("4" * 64).mkdir()
    for digest in ("1", "2", "3"):  # each fetched into its slot, then activated
        make(slots, digest)
        slots.set_active(slot(digest))
    assert (slots.active(), slots.previous()) == (slot("3"), slot("2"))
    assert sorted(p.name[:1] for p in slots.root.iterdir()) == ["2", "3", "4"]  # a partial one stays


def test_pointing_at_the_active_slot_again_keeps_the_previous_one(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    make(slots, "1")
    slots.set_active(slot("1"))
    make(slots, "2")
    slots.set_active(slot("2"))
    slots.set_active(slot("2"))  # a drifted device told its desired state again
    assert (slots.active(), slots.previous()) == (slot("2"), slot("1"))
    assert slots.path("1" * 64).is_dir()
    slots.set_active(slot("1"))  # a rollback: the one rolled back from becomes the previous
    assert (slots.active(), slots.previous()) == (slot("1"), slot("2"))


def test_a_missing_or_damaged_pointer_file_means_nothing_is_active(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    assert slots.active() is None and slots.previous() is None
    for damaged in (b"{not json", b'{"active": {"digest": 7}}', b'["a list"]'):
        slots.active_file.write_bytes(damaged)
        assert slots.active() is None
