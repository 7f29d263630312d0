"""SCRAM server side: RFC 5802 / RFC 7677 vectors, a client written here, and failures."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from xmpp_ha.core.errors import LocalProtocolError
from xmpp_ha.protocol.scram import (
    HASHES,
    SaslFailure,
    ScramServer,
    check_authzid,
    derive_credentials,
    fake_credentials,
    make_nonce,
    parse_plain,
    saslprep,
    verify_plain,
)
from xmpp_ha.store.repository import ScramMechanism

MECHANISMS: list[ScramMechanism] = ["SCRAM-SHA-1", "SCRAM-SHA-256"]

# (mechanism, client-first, server nonce part, salt, client-final, server-final)
VECTORS = [
    pytest.param(
        "SCRAM-SHA-1",
        b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        "3rfcNHYJY1ZVvWVs7j",
        "QSXCR+Q6sek8bf92",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        id="rfc5802",
    ),
    pytest.param(
        "SCRAM-SHA-256",
        b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "W22ZaJ0SNY7soEsUEjb6gQ==",
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        id="rfc7677",
    ),
]


@pytest.mark.parametrize(
    ("mechanism", "client_first", "server_nonce", "salt", "server_first", "client_final", "final"),
    VECTORS,
)
def test_rfc_vectors(
    mechanism: ScramMechanism,
    client_first: bytes,
    server_nonce: str,
    salt: str,
    server_first: bytes,
    client_final: bytes,
    final: bytes,
) -> None:
    credentials = derive_credentials("pencil", mechanism, base64.b64decode(salt), 4096)
    server = ScramServer(mechanism, server_nonce)
    assert server.client_first(client_first) == "user"
    assert server.authzid == ""
    assert server.server_first(credentials) == server_first
    assert server.client_final(client_final) == final


# --- a client, written from RFC 5802 independently of the server ---------------


class ScramClient:
    def __init__(
        self,
        mechanism: ScramMechanism,
        username: str,
        password: str,
        nonce: str,
        authzid: str = "",
        flag: str = "n",
    ) -> None:
        self.hash_name = HASHES[mechanism]
        self.username = username
        self.password = password
        name = username.replace("=", "=3D").replace(",", "=2C")
        zid = authzid.replace("=", "=3D").replace(",", "=2C")
        self.gs2_header = f"{flag},{'a=' + zid if authzid else ''},"
        self.first_bare = f"n={name},r={nonce}"
        self.nonce = nonce
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2_header + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        assert fields["r"].startswith(self.nonce)
        salted = hashlib.pbkdf2_hmac(
            self.hash_name,
            self.password.encode(),
            base64.b64decode(fields["s"]),
            int(fields["i"]),
        )
        client_key = hmac.digest(salted, b"Client Key", self.hash_name)
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        binding = base64.b64encode(self.gs2_header.encode()).decode()
        without_proof = f"c={binding},r={fields['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, self.hash_name)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", self.hash_name)
        self.server_signature = hmac.digest(server_key, auth_message, self.hash_name)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        return server_final == b"v=" + base64.b64encode(self.server_signature)


SALT = b"0123456789abcdef"


def login(
    mechanism: ScramMechanism,
    client: ScramClient,
    password: str,
    domain: str | None = None,
) -> tuple[ScramServer, bytes]:
    server = ScramServer(mechanism, make_nonce(b"\x01" * 18), domain=domain)
    assert server.client_first(client.first()) == client.username
    server_first = server.server_first(derive_credentials(password, mechanism, SALT, 4096))
    return server, server.client_final(client.final(server_first))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_client_and_server_agree(mechanism: ScramMechanism) -> None:
    client = ScramClient(mechanism, "romeo", "s3cret w0rd", "clientnonce123")
    server, final = login(mechanism, client, "s3cret w0rd")
    assert client.verify(final)
    assert server.username == "romeo"


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_wrong_password_is_not_authorized(mechanism: ScramMechanism) -> None:
    client = ScramClient(mechanism, "romeo", "wrong", "clientnonce123")
    with pytest.raises(SaslFailure) as caught:
        login(mechanism, client, "right")
    assert caught.value.condition == "not-authorized"


def test_escaped_username_and_authzid() -> None:
    client = ScramClient("SCRAM-SHA-256", "a,b=c", "pw", "n1", authzid="x=y,z@example.com")
    server = ScramServer("SCRAM-SHA-256", "srv")
    assert server.client_first(client.first()) == "a,b=c"
    assert server.authzid == "x=y,z@example.com"


def test_authzid_checked_when_the_domain_is_known() -> None:
    ok = ScramClient("SCRAM-SHA-256", "romeo", "pw", "n1", authzid="Romeo@Example.com")
    server, final = login("SCRAM-SHA-256", ok, "pw", domain="example.com")
    assert ok.verify(final)
    assert server.authzid == "Romeo@Example.com"
    other = ScramClient("SCRAM-SHA-256", "romeo", "pw", "n1", authzid="juliet@example.com")
    with pytest.raises(SaslFailure) as caught:
        ScramServer("SCRAM-SHA-256", "srv", domain="example.com").client_first(other.first())
    assert caught.value.condition == "invalid-authzid"


def test_check_authzid() -> None:
    check_authzid("", "romeo", "example.com")
    check_authzid("romeo@example.com", "romeo", "example.com")
    for bad in ("juliet@example.com", "romeo@example.com/res", "romeo@other.net", "@@", "x"):
        with pytest.raises(SaslFailure):
            check_authzid(bad, "romeo", "example.com")


def test_y_flag_is_accepted() -> None:
    client = ScramClient("SCRAM-SHA-1", "romeo", "pw", "n1", flag="y")
    server, final = login("SCRAM-SHA-1", client, "pw")
    assert client.verify(final)


def test_saslprep_applies_to_the_username() -> None:
    server = ScramServer("SCRAM-SHA-256", "srv")
    assert server.client_first("n,,n=I\u00adX,r=abc".encode()) == "IX"


@pytest.mark.parametrize(
    "message",
    [
        b"p=tls-unique,,n=user,r=abc",  # channel binding requested
        b"x,,n=user,r=abc",
        b"n,,m=ext,n=user,r=abc",  # mandatory extension
        b"n,,n=user",
        b"n,,r=abc,n=user",
        b"n,n=user,r=abc",
        b"n,b=zid,n=user,r=abc",
        b"n,,n=,r=abc",
        b"n,,n=us=er,r=abc",  # '=' not followed by 2C or 3D
        b"n,,n=us=2Ger,r=abc",
        b"n,,n=user,r=",
        b"n,,n=user,r=a b",
        b"n,,n=user\x01,r=abc",  # control character
        b"n,,n=\xff,r=abc",  # not UTF-8
        b"",
        b"n,,n=" + b"a" * 5000 + b",r=abc",
    ],
)
def test_malformed_client_first(message: bytes) -> None:
    with pytest.raises(SaslFailure) as caught:
        ScramServer("SCRAM-SHA-256", "srv").client_first(message)
    assert caught.value.condition == "malformed-request"


def final_failure(mutate: str, mechanism: ScramMechanism = "SCRAM-SHA-256") -> str:
    client = ScramClient(mechanism, "romeo", "pw", "n1")
    server = ScramServer(mechanism, "srv")
    server.client_first(client.first())
    final = client.final(server.server_first(derive_credentials("pw", mechanism, SALT, 4096)))
    text = final.decode()
    mutated = {
        "no-proof": text.rpartition(",p=")[0],
        "bad-base64": text.rpartition(",p=")[0] + ",p=!!!",
        "short-proof": text.rpartition(",p=")[0] + ",p=AAAA",
        "nonce": text.replace("r=n1srv", "r=n1srvX"),
        "binding": text.replace("c=biws", "c=eSws"),
        "bit-flip": text[:-3] + ("A" if text[-3] != "A" else "B") + text[-2:],
        "order": text.replace("c=biws,", "") + ",c=biws",
    }[mutate]
    with pytest.raises(SaslFailure) as caught:
        server.client_final(mutated.encode())
    return caught.value.condition


@pytest.mark.parametrize(
    ("mutate", "condition"),
    [
        ("no-proof", "malformed-request"),
        ("bad-base64", "malformed-request"),
        ("short-proof", "not-authorized"),
        ("nonce", "not-authorized"),
        ("binding", "not-authorized"),
        ("bit-flip", "not-authorized"),
        ("order", "malformed-request"),
    ],
)
def test_bad_client_final(mutate: str, condition: str) -> None:
    assert final_failure(mutate) == condition


def test_extensions_in_client_final_are_covered_by_the_proof() -> None:
    client = ScramClient("SCRAM-SHA-256", "romeo", "pw", "n1")
    server = ScramServer("SCRAM-SHA-256", "srv")
    server.client_first(client.first())
    server_first = server.server_first(derive_credentials("pw", "SCRAM-SHA-256", SALT, 4096))
    final = client.final(server_first)
    with pytest.raises(SaslFailure):  # inserting an extension breaks the signature
        server.client_final(final.replace(b",p=", b",x=1,p="))


def test_out_of_order_calls_are_local_errors() -> None:
    server = ScramServer("SCRAM-SHA-256", "srv")
    with pytest.raises(LocalProtocolError):
        server.server_first(derive_credentials("pw", "SCRAM-SHA-256", SALT, 4096))
    with pytest.raises(LocalProtocolError):
        server.client_final(b"c=biws,r=x,p=AAAA")
    server.client_first(b"n,,n=user,r=abc")
    with pytest.raises(LocalProtocolError):
        server.client_first(b"n,,n=user,r=abc")
    with pytest.raises(LocalProtocolError):  # credentials of the other mechanism
        server.server_first(derive_credentials("pw", "SCRAM-SHA-1", SALT, 4096))


def test_failure_spends_the_exchange() -> None:
    server = ScramServer("SCRAM-SHA-256", "srv")
    with pytest.raises(SaslFailure):
        server.client_first(b"garbage")
    with pytest.raises(LocalProtocolError):
        server.client_first(b"n,,n=user,r=abc")


def test_server_nonce_validated() -> None:
    for bad in ("", "a,b", "a b", "\u00e9"):
        with pytest.raises(ValueError):
            ScramServer("SCRAM-SHA-256", bad)
    assert len(make_nonce(bytes(18))) == 24


# --- missing accounts look like wrong passwords -----------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fake_credentials_are_stable_and_indistinguishable(mechanism: ScramMechanism) -> None:
    secret = b"node secret"
    fake = fake_credentials(mechanism, "nobody", secret)
    assert fake == fake_credentials(mechanism, "nobody", secret)
    assert fake.salt != fake_credentials(mechanism, "somebody", secret).salt
    assert fake.salt != fake_credentials(mechanism, "nobody", b"other secret").salt
    real = derive_credentials("pw", mechanism, SALT, 4096)
    assert len(fake.salt) == len(real.salt)
    assert fake.iterations == real.iterations
    assert len(fake.stored_key) == len(real.stored_key)
    assert len(fake.server_key) == len(real.server_key)

    client = ScramClient(mechanism, "nobody", "pw", "n1")
    server = ScramServer(mechanism, "srv")
    server.client_first(client.first())
    server_first = server.server_first(fake)
    with pytest.raises(SaslFailure) as caught:
        server.client_final(client.final(server_first))
    assert caught.value.condition == "not-authorized"


# --- PLAIN ----------------------------------------------------------------------


def test_parse_plain() -> None:
    assert parse_plain(b"\x00romeo\x00pw") == ("", "romeo", "pw")
    assert parse_plain(b"romeo@example.com\x00romeo\x00pw") == (
        "romeo@example.com",
        "romeo",
        "pw",
    )
    assert parse_plain("\x00r\u00adomeo\x00p\u00e4ss".encode()) == ("", "romeo", "p\u00e4ss")


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"romeo",
        b"\x00romeo",
        b"\x00\x00pw",
        b"\x00romeo\x00",
        b"a\x00b\x00c\x00d",
        b"\x00\xff\x00pw",
    ],
)
def test_parse_plain_malformed(message: bytes) -> None:
    with pytest.raises(SaslFailure) as caught:
        parse_plain(message)
    assert caught.value.condition == "malformed-request"


def test_verify_plain() -> None:
    stored = derive_credentials("p\u00e4ss", "SCRAM-SHA-256", SALT, 4096)
    assert verify_plain("p\u00e4ss", stored)
    assert not verify_plain("pass", stored)
    assert not verify_plain("bad\x01", stored)


def test_saslprep_kept() -> None:
    assert saslprep("a\u00a0b") == "a b"
    with pytest.raises(ValueError):
        saslprep("a\x07")
