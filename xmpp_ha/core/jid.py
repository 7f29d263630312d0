"""JIDs (RFC 7622), with the checks a server needs before trusting an address.

Localpart and domainpart are case-folded; the resourcepart is kept as given.
Each part is at most 1023 bytes of UTF-8. This is a practical subset of
PRECIS: it refuses the characters RFC 7622 forbids in a localpart, control
characters and whitespace, and folds case with `str.casefold()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

_FORBIDDEN_LOCAL = frozenset("\"&'/:<>@")
_MAX_PART = 1023


class InvalidJID(ValueError):
    pass


def _check_part(part: str, what: str) -> None:
    if not part:
        raise InvalidJID(f"empty {what}")
    if len(part.encode("utf-8")) > _MAX_PART:
        raise InvalidJID(f"{what} longer than {_MAX_PART} bytes")
    for char in part:
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise InvalidJID(f"control character in {what}")


def _prep_local(local: str) -> str:
    _check_part(local, "localpart")
    if any(c in _FORBIDDEN_LOCAL or c.isspace() for c in local):
        raise InvalidJID("forbidden character in localpart")
    return local.casefold()


def _prep_domain(domain: str) -> str:
    domain = domain.rstrip(".")
    _check_part(domain, "domainpart")
    if any(c.isspace() or c in "@/" for c in domain):
        raise InvalidJID("forbidden character in domainpart")
    return domain.casefold()


def _prep_resource(resource: str) -> str:
    _check_part(resource, "resourcepart")
    return resource


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
