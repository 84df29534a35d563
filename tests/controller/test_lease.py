"""The rollout lease on a real database (SQLite and PostgreSQL): one holder at a time, taken over when it
expires, and a decision under a lost epoch rolled back."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from slmops.controller.db import open_database
from slmops.controller.lease import Lease, LeaseLost


@pytest.fixture
def engine(database_url: str):
    engine = open_database(database_url)
    yield engine
    engine.dispose()


def test_one_replica_holds_the_lease_and_another_takes_it_when_it_expires(engine) -> None:
    now = datetime.now(UTC)
    a, b = Lease(engine, "rollouts", "replica-a", ttl_s=10), Lease(engine, "rollouts", "replica-b", ttl_s=10)
    assert a.hold(now) == 1
    assert b.hold(now + timedelta(seconds=1)) is None, "held by a"
    assert a.hold(now + timedelta(seconds=5)) == 1, "renewed, same epoch"
    assert b.hold(now + timedelta(seconds=14)) is None, "a renewed at +5 s: it holds until +15 s"
    assert b.hold(now + timedelta(seconds=16)) == 2, "expired: taken, epoch one up"
    with Session(engine) as session, session.begin(), pytest.raises(LeaseLost, match="replica-a"):
        a.fence(session)
    assert a.epoch is None
    assert a.hold(now + timedelta(seconds=17)) is None


def test_a_replica_restarted_under_its_name_takes_its_lease_back_at_once_with_a_new_epoch(engine) -> None:
    before = Lease(engine, "rollouts", "host:8700", ttl_s=60)
    assert before.hold() == 1
    restarted = Lease(engine, "rollouts", "host:8700", ttl_s=60)
    assert restarted.hold() == 2
    with Session(engine) as session, session.begin(), pytest.raises(LeaseLost):
        before.fence(session)  # the old process, were it still alive, decides nothing more


def test_a_fenced_decision_commits_while_the_epoch_holds(engine) -> None:
    lease = Lease(engine, "rollouts", "replica-a", ttl_s=10)
    lease.hold()
    with Session(engine) as session, session.begin():
        lease.fence(session)
    never = Lease(engine, "rollouts", "replica-b", ttl_s=10)
    with Session(engine) as session, session.begin(), pytest.raises(LeaseLost):
        never.fence(session)  # never held it
