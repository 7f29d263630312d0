"""SCRAM (RFC 5802, RFC 7677): stored secrets and the server side of the exchange.

Pure: no clock, no I/O; the nonce source is injected. The server keeps only
StoredKey and ServerKey, so a stolen store does not give away passwords and a
login costs the server a few HMACs instead of a PBKDF2 run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import unicodedata
from enum import Enum, auto
from typing import Literal

from xmpp_ha.core.errors import LocalProtocolError
from xmpp_ha.core.jid import JID, InvalidJID
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
    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in text if c != "\u00ad")
    normalized = unicodedata.normalize("NFKC", mapped)
    if any(unicodedata.category(c) == "Cc" for c in normalized):
        raise ValueError("control characters are not allowed in a password")
    return normalized


# --- the server side of the exchange ------------------------------------------

SaslCondition = Literal[
    "malformed-request",
    "not-authorized",
    "invalid-authzid",
    "encryption-required",
    "invalid-mechanism",
    "aborted",
]
_MAX_MESSAGE_BYTES = 4096  # a SCRAM or PLAIN message is a few hundred bytes
_NONCE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}


class SaslFailure(Exception):
    """The exchange failed; `condition` names the RFC 6120 §6.5 `<failure/>` child."""

    def __init__(self, condition: SaslCondition, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition: SaslCondition = condition
        self.text = text


class _Step(Enum):
    CLIENT_FIRST = auto()  # waiting for client-first-message
    CREDENTIALS = auto()  # username known, waiting for the store's credentials
    CLIENT_FINAL = auto()  # server-first sent, waiting for client-final-message
    DONE = auto()  # authenticated; server-final returned
    FAILED = auto()  # a SaslFailure was raised; the object is spent


def make_nonce(random_bytes: bytes) -> str:
    """A server nonce from bytes the caller took from `os.urandom` (18 bytes -> 24 chars)."""
    return base64.b64encode(random_bytes).decode("ascii")


def check_authzid(authzid: str, username: str, domain: str) -> None:
    """An authzid is allowed only if empty or the user's own bare JID (no proxy auth)."""
    if not authzid:
        return
    try:
        own = JID.make(username, domain)
        if JID.parse(authzid) == own:
            return
    except InvalidJID:
        pass
    raise SaslFailure("invalid-authzid", "you may only act as yourself")


def _decode_saslname(text: str) -> str:
    """RFC 5802 saslname: ',' and '=' arrive as '=2C' and '=3D'; any other '=' is an error."""
    if "=" not in text:
        return text
    pieces = text.split("=")
    decoded = [pieces[0]]
    for piece in pieces[1:]:
        if piece[:2] == "2C":
            decoded.append("," + piece[2:])
        elif piece[:2] == "3D":
            decoded.append("=" + piece[2:])
        else:
            raise SaslFailure("malformed-request", "bad '=' escape in a name")
    return "".join(decoded)


def _decode(message: bytes) -> str:
    if len(message) > _MAX_MESSAGE_BYTES:
        raise SaslFailure("malformed-request", "message too long")
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslFailure("malformed-request", "not UTF-8") from exc


class ScramServer:
    """The server side of one SCRAM-SHA-1 / SCRAM-SHA-256 exchange, without channel binding.

    Order: `client_first()` -> (caller fetches credentials, or `fake_credentials()`
    for an unknown user) -> `server_first()` -> `client_final()`. Calling out of
    order is a `LocalProtocolError`; a `SaslFailure` ends the exchange.
    """

    def __init__(self, mechanism: ScramMechanism, nonce: str, *, domain: str | None = None) -> None:
        if mechanism not in HASHES:
            raise ValueError(f"unknown SCRAM mechanism {mechanism!r}")
        if not nonce or not _NONCE_CHARS.issuperset(nonce):
            raise ValueError("the server nonce must be printable ASCII without ','")
        self.mechanism: ScramMechanism = mechanism
        self._hash_name = HASHES[mechanism]
        self._server_nonce = nonce
        self._domain = domain  # when given, client_first checks the authzid itself
        self._step = _Step.CLIENT_FIRST
        self.username = ""
        self.authzid = ""
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._credentials: ScramCredentials | None = None

    def client_first(self, message: bytes) -> str:
        self._advance(_Step.CLIENT_FIRST, _Step.CREDENTIALS)
        try:
            return self._client_first(_decode(message))
        except SaslFailure:
            self._step = _Step.FAILED
            raise

    def _client_first(self, text: str) -> str:
        flag, comma, rest = text.partition(",")
        authzid_field, comma2, bare = rest.partition(",")
        if not (comma and comma2):
            raise SaslFailure("malformed-request", "no GS2 header")
        if flag.startswith("p="):
            raise SaslFailure("malformed-request", "channel binding is not offered")
        if flag not in ("n", "y"):
            raise SaslFailure("malformed-request", "bad channel binding flag")
        if authzid_field and not authzid_field.startswith("a="):
            raise SaslFailure("malformed-request", "bad authzid field")
        authzid = _decode_saslname(authzid_field[2:])
        fields = bare.split(",")
        if fields[0].startswith("m="):
            raise SaslFailure("malformed-request", "mandatory extensions are not supported")
        if len(fields) < 2 or not fields[0].startswith("n=") or not fields[1].startswith("r="):
            raise SaslFailure("malformed-request", "expected n=<user>,r=<nonce>")
        client_nonce = fields[1][2:]
        if not client_nonce or not _NONCE_CHARS.issuperset(client_nonce):
            raise SaslFailure("malformed-request", "bad client nonce")
        try:
            username = saslprep(_decode_saslname(fields[0][2:]))
        except ValueError as exc:
            raise SaslFailure("malformed-request", "bad username") from exc
        if not username:
            raise SaslFailure("malformed-request", "empty username")
        if self._domain is not None:
            check_authzid(authzid, username, self._domain)
        self.username = username
        self.authzid = authzid
        self._gs2_header = f"{flag},{authzid_field},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        return username

    def server_first(self, credentials: ScramCredentials) -> bytes:
        if credentials.mechanism != self.mechanism:
            raise LocalProtocolError(
                f"credentials for {credentials.mechanism}, not {self.mechanism}"
            )
        self._advance(_Step.CREDENTIALS, _Step.CLIENT_FINAL)
        self._credentials = credentials
        salt = base64.b64encode(credentials.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={credentials.iterations}"
        return self._server_first.encode("ascii")

    def client_final(self, message: bytes) -> bytes:
        self._advance(_Step.CLIENT_FINAL, _Step.DONE)
        try:
            return self._client_final(_decode(message))
        except SaslFailure:
            self._step = _Step.FAILED
            raise

    def _client_final(self, text: str) -> bytes:
        credentials = self._credentials
        assert credentials is not None
        without_proof, separator, proof_text = text.rpartition(",p=")
        fields = without_proof.split(",")
        if not separator or len(fields) < 2:
            raise SaslFailure("malformed-request", "expected c=...,r=...,p=...")
        if not fields[0].startswith("c=") or not fields[1].startswith("r="):
            raise SaslFailure("malformed-request", "expected c=...,r=...,p=...")
        try:
            binding = base64.b64decode(fields[0][2:], validate=True)
            proof = base64.b64decode(proof_text, validate=True)
        except binascii.Error as exc:
            raise SaslFailure("malformed-request", "bad base64") from exc
        if binding != self._gs2_header.encode():
            raise SaslFailure("not-authorized", "channel binding data does not match")
        if fields[1][2:] != self._nonce:
            raise SaslFailure("not-authorized", "nonce does not match")
        hash_name = self._hash_name
        if len(proof) != len(credentials.stored_key):
            raise SaslFailure("not-authorized", "bad proof")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_signature = hmac.digest(credentials.stored_key, auth_message, hash_name)
        client_key = _xor(proof, client_signature)
        if not hmac.compare_digest(
            hashlib.new(hash_name, client_key).digest(), credentials.stored_key
        ):
            raise SaslFailure("not-authorized")
        server_signature = hmac.digest(credentials.server_key, auth_message, hash_name)
        return b"v=" + base64.b64encode(server_signature)

    def _advance(self, expected: _Step, following: _Step) -> None:
        if self._step is not expected:
            raise LocalProtocolError(f"SCRAM exchange is at {self._step.name}, not {expected.name}")
        self._step = following


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


def fake_credentials(
    mechanism: ScramMechanism,
    username: str,
    secret: bytes,
    *,
    salt_length: int = 16,
    iterations: int = DEFAULT_ITERATIONS,
) -> ScramCredentials:
    """Credentials for an account that does not exist, so it looks like a wrong password.

    The salt is the same for every attempt on one username (a random one would
    reveal the account is missing), and only holders of `secret` can compute it.
    Match `salt_length` and `iterations` to the real accounts.
    """
    hash_name = HASHES[mechanism]
    label = f"{mechanism}\0{username}".encode()
    salt = hmac.digest(secret, b"xmpp-ha fake salt\0" + label, "sha256")[:salt_length]
    stored_key = hmac.digest(secret, b"xmpp-ha fake stored key\0" + label, hash_name)
    server_key = hmac.digest(secret, b"xmpp-ha fake server key\0" + label, hash_name)
    return ScramCredentials(mechanism, salt, iterations, stored_key, server_key)


def parse_plain(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 PLAIN: (authzid, authcid saslprep'd, password as sent)."""
    parts = _decode(message).split("\0")
    if len(parts) != 3:
        raise SaslFailure("malformed-request", "expected authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SaslFailure("malformed-request", "empty username or password")
    try:
        return authzid, saslprep(authcid), password
    except ValueError as exc:
        raise SaslFailure("malformed-request", "bad username") from exc


def verify_plain(password: str, credentials: ScramCredentials) -> bool:
    """Check a PLAIN password against stored SCRAM keys (one PBKDF2 run)."""
    try:
        derived = derive_credentials(
            password, credentials.mechanism, credentials.salt, credentials.iterations
        )
    except ValueError:
        return False
    return hmac.compare_digest(derived.stored_key, credentials.stored_key)
