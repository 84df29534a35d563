"""One replica decides at a time: a lease row with a fencing epoch.

    controller_lease(name, holder, epoch, expires_at)
    hold(now), each rollout tick:
        the row's holder is this replica (the same name: this process, or this replica restarted)
            ─► renewed (a restarted replica takes it at once, with the epoch one up)
        expired, or no row yet ─► taken: holder = this replica, epoch + 1
        held by another, not expired ─► None: this replica decides nothing this tick
    fence(session), inside every decision's transaction, before it commits:
        UPDATE ... WHERE name, holder and epoch are still this replica's and it has not expired
        ─► one row: the decision commits (the row stays locked until then, so no takeover lands
           between the check and the commit) · none: LeaseLost, the decision is rolled back

The lease lives in the database every replica shares, not in a session-bound advisory lock: a
replica whose connection stalls does not keep deciding on a lock it no longer holds, and a replica
that paused past its lease (a long GC, a frozen VM) finds its epoch gone at its next commit.
"""

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops.errors import SlmopsError

from .db import LeaseRow

log = logging.getLogger(__name__)


class LeaseLost(SlmopsError):
    """A decision found that this replica no longer holds the lease it was taken under."""


class Lease:
    def __init__(self, engine: Engine, name: str, holder: str, ttl_s: float) -> None:
        self.engine, self.name, self.holder, self.ttl = engine, name, holder, timedelta(seconds=ttl_s)
        self.epoch: int | None = None
        """The epoch this replica holds; None when it holds none."""

    def hold(self, now: datetime | None = None) -> int | None:
        """Renew or take the lease; the epoch held, or None when another replica holds it."""
        now = now or datetime.now(UTC)
        held = self.epoch
        try:
            with Session(self.engine) as session, session.begin():
                row = session.get(LeaseRow, self.name, with_for_update=True)
                if row is None:
                    row = LeaseRow(name=self.name, holder=self.holder, epoch=1, expires_at=now + self.ttl)
                    session.add(row)
                elif row.holder == self.holder or _aware(row.expires_at) <= now:
                    if row.holder != self.holder or row.epoch != held:
                        row.holder, row.epoch = self.holder, row.epoch + 1
                    row.expires_at = now + self.ttl
                else:
                    self.epoch = None
                    return None
                self.epoch = row.epoch
        except IntegrityError:  # another replica made the row first
            self.epoch = None
            return None
        if self.epoch != held:
            log.info("holding the %s lease as %s, epoch %d", self.name, self.holder, self.epoch)
        return self.epoch

    def fence(self, session: Session, now: datetime | None = None) -> None:
        """In a decision's transaction: LeaseLost unless this replica still holds the epoch; locks the row
        until the transaction ends."""
        now = now or datetime.now(UTC)
        if self.epoch is not None:
            result = session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == self.name,
                    LeaseRow.holder == self.holder,
                    LeaseRow.epoch == self.epoch,
                    LeaseRow.expires_at > now,
                )
                .values(expires_at=LeaseRow.expires_at)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return
        lost, self.epoch = self.epoch, None
        raise LeaseLost(f"{self.holder} no longer holds the {self.name} lease (epoch {lost})")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
