"""Who changed what: the actor behind each API call, and the audit row every change writes."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from .db import AuditRow


@dataclass(frozen=True)
class Actor:
    name: str
    role: str


def record(
    session: Session, actor: Actor, action: str, target: str, detail: dict[str, Any], bundle_id: int | None = None
) -> None:
    """Add the audit row in the caller's transaction, so the change and its record commit together."""
    session.add(AuditRow(actor=actor.name, action=action, target=target, detail=detail, bundle_id=bundle_id))
