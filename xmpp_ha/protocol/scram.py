"""SCRAM (RFC 5802, RFC 7677): stored secrets and the server side of the exchange.

Pure: no clock, no I/O; the nonce source is injected. The server keeps only
StoredKey and ServerKey, so a stolen store does not give away passwords and a
login costs the server a few HMACs instead of a PBKDF2 run.
"""

from __future__ import annotations

import hashlib
import hmac

from xmpp_ha.store.repository import ScramCredentials, ScramMechanism

DEFAULT_ITERATIONS = 4096
HASHES: dict[ScramMechanism, str] = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def derive_credentials(
    password: str, mechanism: ScramMechanism, salt: bytes, iterations: int = DEFAULT_ITERATIONS
) -> ScramCredentials:
    hash_name = HASHES[mechanism]
    salted = hashlib.pbkdf2_hmac(hash_name, saslprep(password).encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return ScramCredentials(mechanism, salt, iterations, stored_key, server_key)


def saslprep(text: str) -> str:
    """The parts of SASLprep (RFC 4013) that matter for passwords: NFKC and no controls."""
    import unicodedata

    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in text if c != "\u00ad")
    normalized = unicodedata.normalize("NFKC", mapped)
    if any(unicodedata.category(c) == "Cc" for c in normalized):
        raise ValueError("control characters are not allowed in a password")
    return normalized
