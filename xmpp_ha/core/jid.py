"""JIDs (RFC 7622), with the checks a server needs before trusting an address.

Localpart and domainpart are case-folded; the resourcepart is kept as given.
Each part is at most 1023 bytes of UTF-8. This is a practical subset of
PRECIS: it refuses the characters RFC 7622 forbids in a localpart, control
characters and whitespace, and folds case with `str.casefold()`.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

_FORBIDDEN_LOCAL = frozenset("\"&'/:<>@")
_MAX_PART = 1023


class InvalidJID(ValueError):
    pass


def _check_part(part: str, what: str) -> str:
    """Checks the prepared text (after case folding, which can lengthen it)."""
    if not part:
        raise InvalidJID(f"empty {what}")
    if len(part.encode("utf-8")) > _MAX_PART:
        raise InvalidJID(f"{what} longer than {_MAX_PART} bytes")
    if any(unicodedata.category(char) == "Cc" for char in part):
        raise InvalidJID(f"control character in {what}")
    return part


def _prep_local(local: str) -> str:
    if any(c in _FORBIDDEN_LOCAL or c.isspace() for c in local):
        raise InvalidJID("forbidden character in localpart")
    return _check_part(local.casefold(), "localpart")


def _prep_domain(domain: str) -> str:
    domain = domain.rstrip(".")
    if domain.startswith("[") and domain.endswith("]"):  # IPv6 literal
        try:
            return str(ipaddress.IPv6Address(domain[1:-1])).join("[]")
        except ValueError as exc:
            raise InvalidJID("bad IPv6 literal in domainpart") from exc
    labels = domain.casefold().split(".")
    for label in labels:
        if not label or label.startswith("-") or label.endswith("-"):
            raise InvalidJID("domainpart is no host name")
        if any(c.isascii() and not (c.isalnum() or c == "-") for c in label):
            raise InvalidJID("forbidden character in domainpart")
    return _check_part(".".join(labels), "domainpart")


def _prep_resource(resource: str) -> str:
    return _check_part(resource, "resourcepart")


@dataclass(frozen=True, slots=True)
class JID:
    local: str
    domain: str
    resource: str = ""

    @classmethod
    def parse(cls, text: str) -> JID:
        return _parse_cached(text)

    @classmethod
    def _parse(cls, text: str) -> JID:
        bare, slash, resource = text.partition("/")
        if slash and not resource:
            raise InvalidJID("empty resourcepart")
        local, at, domain = bare.rpartition("@")
        if at and not local:
            raise InvalidJID("empty localpart")
        return cls(
            _prep_local(local) if at else "",
            _prep_domain(domain),
            _prep_resource(resource) if slash else "",
        )

    @classmethod
    def make(cls, local: str, domain: str, resource: str = "") -> JID:
        return cls(
            _prep_local(local) if local else "",
            _prep_domain(domain),
            _prep_resource(resource) if resource else "",
        )

    @property
    def bare(self) -> JID:
        return JID(self.local, self.domain) if self.resource else self

    @property
    def is_bare(self) -> bool:
        return not self.resource

    def with_resource(self, resource: str) -> JID:
        return JID(self.local, self.domain, _prep_resource(resource))

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{text}/{self.resource}" if self.resource else text


@lru_cache(maxsize=65536)
def _parse_cached(text: str) -> JID:
    """Every stanza carries two JIDs; the same few thousand recur, so parse each once."""
    return JID._parse(text)
