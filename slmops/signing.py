"""Ed25519 signatures over a manifest's canonical bytes, and the keys that make them.

A bundle is trusted when `signature.json` verifies against one of the public keys
the verifier was given (or, when none is named, the `.pub` files in the trusted-keys
folder). A key is named by its id: the first 16 hex digits of sha256 over its raw bytes.
"""

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops import paths
from slmops.errors import SignatureError

SIGNATURE_FILE = "signature.json"


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str
    """Base64 of the 64-byte Ed25519 signature over the manifest's canonical bytes."""

    @classmethod
    def parse(cls, raw: bytes, origin: str = SIGNATURE_FILE) -> "Signature":
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            raise SignatureError(f"{origin} is malformed: {e.errors()[0]['msg']}") from None


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(stem: Path) -> tuple[Path, Path]:
    """Write `STEM.key` (private, PKCS#8 PEM, owner-only) and `STEM.pub` (public PEM)."""
    private_path, public_path = stem.with_suffix(".key"), stem.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite a key")
    stem.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as e:
        raise SignatureError(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def trusted_keys(key_paths: Iterable[Path] = ()) -> list[Ed25519PublicKey]:
    """The keys named, or else every `.pub` in the trusted-keys folder."""
    named = list(key_paths)
    if not named and paths.keys_dir().is_dir():
        named = sorted(paths.keys_dir().glob("*.pub"))
    return [load_public_key(p) for p in named]


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> Signature:
    return Signature(
        key_id=key_id(private_key.public_key()),
        signature=base64.b64encode(private_key.sign(manifest_bytes)).decode(),
    )


def check_signature(manifest_bytes: bytes, signature: Signature | None, keys: list[Ed25519PublicKey]) -> str:
    """Return the id of the trusted key that signed these bytes, or raise SignatureError."""
    if signature is None:
        raise SignatureError(f"the bundle is not signed: no {SIGNATURE_FILE}")
    if not keys:
        raise SignatureError(f"no trusted keys: name one with --trusted-key or put .pub files in {paths.keys_dir()}")
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(signature.key_id)
    if key is None:
        raise SignatureError(
            f"the bundle is signed by unknown key {signature.key_id}; trusted keys: {', '.join(sorted(by_id))}"
        )
    try:
        raw = base64.b64decode(signature.signature, validate=True)
        key.verify(raw, manifest_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(
            f"the signature by key {signature.key_id} does not match the manifest: "
            "the manifest was altered after signing, or the signature is corrupt"
        ) from None
    return signature.key_id
