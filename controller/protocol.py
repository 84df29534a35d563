"""Request and response models of the controller's REST API."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .db import AuditRow, BundleRow


class BundleSummary(BaseModel):
    name: str
    version: str
    digest: str
    size_bytes: int
    variants: list[str]
    pushed_at: datetime
    pushed_by: str

    @classmethod
    def of(cls, row: BundleRow) -> "BundleSummary":
        return cls(
            name=row.name,
            version=row.version,
            digest=row.digest,
            size_bytes=row.size_bytes,
            variants=[v["id"] for v in row.manifest["variants"]],
            pushed_at=row.pushed_at,
            pushed_by=row.pushed_by,
        )


class BundleDetail(BundleSummary):
    manifest: dict[str, Any]

    @classmethod
    def of(cls, row: BundleRow) -> "BundleDetail":
        return cls(**BundleSummary.of(row).model_dump(), manifest=row.manifest)


class AuditEntry(BaseModel):
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: AuditRow) -> "AuditEntry":
        return cls(at=row.at, actor=row.actor, action=row.action, target=row.target, detail=row.detail)


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """The one error shape of the controller's API (the agent's, without `param`)."""
    return {"error": {"message": message, "type": type_, "code": code}}
