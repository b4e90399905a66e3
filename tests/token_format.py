#!/usr/bin/env python3
"""Checks piiwall tokens against docs/token-format.md, with no piiwall code: a second implementation of the spec.

Usage: python3 tests/token_format.py VECTORS.json

VECTORS.json is a list of objects {"secret": hex, "context": str, "kind": "pwt1" | "pwe2" | "pwe1" | "pwh1",
"token": str, "plaintext": hex}: `secret` is the 32-byte data key, `plaintext` the tagged plaintext (a type tag byte,
then the value's bytes). Each token is decrypted and compared with its plaintext; a pwt1 token's nonce is also
recomputed (it is synthetic), a pwe2 ciphertext's padding is checked byte for byte, and a pwh1 hash is recomputed.
Prints "N passed, M failed" and exits non-zero when a vector fails. Needs Python 3.11 and `cryptography`.
"""

import base64
import hmac
import json
import re
import struct
import sys

try:
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hmac import HMAC
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError:
    sys.exit("token_format.py needs the `cryptography` package: pip install cryptography")

HKDF_SALT = b"piiwall dek v1"
KEY_ID_LEN = 12
NONCE_LEN = 12
TAG_LEN = 16
MAC_LEN = 32
PAD_MARK = 0x80
BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

# prefix -> (HKDF label of the key, kind letter and format version of the associated data)
FORMATS = {
    "pwt1": (b"tokenize", b"t", 1),
    "pwe2": (b"encrypt", b"e", 2),
    "pwe1": (b"encrypt", b"e", 1),
    "pwh1": (b"hash", b"h", 1),
}


class Mismatch(Exception):
    """A vector that does not follow the spec; the message says which step failed (never a value)."""


def b64url_decode(text: str, what: str) -> bytes:
    """Unpadded URL-safe base64, canonical only (as the Rust `base64` crate decodes it)."""
    if not BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise Mismatch(f"{what} is not unpadded URL-safe base64")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise Mismatch(f"{what} is not canonical base64 (stray trailing bits)")
    return data


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def derive(secret: bytes, label: bytes) -> bytes:
    """One purpose key: HKDF-SHA256, salt "piiwall dek v1", IKM the data key, info the label, 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=label).derive(secret)


def keyed_mac(key: bytes, context: bytes, plaintext: bytes) -> bytes:
    """HMAC-SHA256 over u32be(len(context)) || context || plaintext."""
    mac = HMAC(key, hashes.SHA256())
    mac.update(struct.pack(">I", len(context)))
    mac.update(context)
    mac.update(plaintext)
    return mac.finalize()


def padded_len(n: int) -> int:
    """The next multiple of 16 strictly above n, at least 32."""
    return max((n // 16 + 1) * 16, 32)


def parse(token: str) -> tuple[str, bytes, bytes]:
    parts = token.split(".")
    if len(parts) != 3:
        raise Mismatch("expected three dot-separated parts: prefix.key-id.payload")
    prefix, key_id_text, payload_text = parts
    if prefix not in FORMATS:
        raise Mismatch("unknown prefix")
    if len(key_id_text) != 16:
        raise Mismatch("the key id is not 16 characters")
    key_id = b64url_decode(key_id_text, "the key id")
    payload = b64url_decode(payload_text, "the payload")
    return prefix, key_id, payload


def verify(vector: dict) -> None:
    secret = bytes.fromhex(vector["secret"])
    context = vector["context"].encode("utf-8")
    expected = bytes.fromhex(vector["plaintext"])
    if len(secret) != 32:
        raise Mismatch("a data key has 32 bytes")
    prefix, key_id, payload = parse(vector["token"])
    if prefix != vector["kind"]:
        raise Mismatch(f"the token is a {prefix}, the vector says {vector['kind']}")
    label, letter, version = FORMATS[prefix]
    key = derive(secret, label)

    if prefix == "pwh1":
        if len(payload) != MAC_LEN:
            raise Mismatch("a pwh1 payload has 32 bytes")
        mac = HMAC(key, hashes.SHA256())
        mac.update(struct.pack(">I", len(context)) + context + expected)
        try:
            mac.verify(payload)
        except InvalidSignature:
            raise Mismatch("the hash is not HMAC-SHA256 of the plaintext under the hash key") from None
        return

    if len(payload) < NONCE_LEN + TAG_LEN:
        raise Mismatch("the payload is shorter than a nonce and a tag")
    nonce, sealed = payload[:NONCE_LEN], payload[NONCE_LEN:]
    associated_data = letter + bytes([version]) + key_id + context
    try:
        opened = AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        raise Mismatch("AES-256-GCM does not authenticate the payload") from None

    if prefix == "pwe2":
        end = len(opened.rstrip(b"\x00")) - 1
        if end < 0 or opened[end] != PAD_MARK:
            raise Mismatch("the padded plaintext does not end in 0x80 then zero bytes")
        if len(opened) != padded_len(end):
            raise Mismatch("the padded plaintext is not padded_len(n) bytes")
        opened = opened[:end]
    if not hmac.compare_digest(opened, expected):
        raise Mismatch("the decrypted plaintext differs")
    if prefix == "pwt1":
        synthetic = keyed_mac(derive(secret, b"tokenize nonce"), context, expected)[:NONCE_LEN]
        if not hmac.compare_digest(nonce, synthetic):
            raise Mismatch("the nonce is not the synthetic one")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as file:
        vectors = json.load(file)
    if not isinstance(vectors, list) or not vectors:
        print("the vectors file holds no vector", file=sys.stderr)
        return 2
    passed = failed = 0
    for index, vector in enumerate(vectors):
        try:
            verify(vector)
            passed += 1
        except (Mismatch, KeyError, ValueError, TypeError) as error:
            failed += 1
            kind = vector.get("kind", "?") if isinstance(vector, dict) else "?"
            print(f"vector {index} ({kind}): {type(error).__name__}: {error}", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
