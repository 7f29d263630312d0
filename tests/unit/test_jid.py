"""JIDs (RFC 7622): parsing, preparation, limits and the canonical text form."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from xmpp_ha.core.jid import JID, InvalidJID


@pytest.mark.parametrize(
    ("text", "local", "domain", "resource"),
    [
        ("juliet@example.com/balcony", "juliet", "example.com", "balcony"),
        ("juliet@example.com", "juliet", "example.com", ""),
        ("example.com", "", "example.com", ""),
        ("example.com/service", "", "example.com", "service"),
        # the first '/' ends the bare JID: '@' and '/' are fine in a resource
        ("juliet@example.com/foo/bar@baz", "juliet", "example.com", "foo/bar@baz"),
        ("example.com/a@b", "", "example.com", "a@b"),
        # a resource keeps its case and its spaces (FreeformClass)
        ("Juliet@EXAMPLE.com/Balcony Two ", "juliet", "example.com", "Balcony Two "),
        ("juliet@example.com./r", "juliet", "example.com", "r"),  # the final dot goes
        ("\u00e9lise@\u00c9xample.com", "\u00e9lise", "\u00e9xample.com", ""),
        ("[::1]", "", "[::1]", ""),
        ("192.0.2.1", "", "192.0.2.1", ""),
    ],
)
def test_parse(text: str, local: str, domain: str, resource: str) -> None:
    jid = JID.parse(text)
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("@example.com", id="empty-local"),
        pytest.param("juliet@", id="empty-domain"),
        pytest.param("juliet@example.com/", id="empty-resource"),
        pytest.param("/balcony", id="only-resource"),
        pytest.param(".", id="only-dot"),
        pytest.param("juliet@.", id="dot-domain"),
        pytest.param("jul@iet@example.com", id="at-in-local"),
        pytest.param("ju liet@example.com", id="space-in-local"),
        pytest.param("ju\u00a0liet@example.com", id="nbsp-in-local"),
        pytest.param("ju\u2003liet@example.com", id="em-space-in-local"),
        pytest.param("juliet@exa mple.com", id="space-in-domain"),
        pytest.param("juliet\x00@example.com", id="nul-in-local"),
        pytest.param("juliet@example\x1f.com", id="control-in-domain"),
        pytest.param("juliet@example.com/bal\x7fcony", id="del-in-resource"),
        pytest.param("juliet@example.com/bal\ncony", id="newline-in-resource"),
        *(pytest.param(f"ju{c}liet@example.com", id=f"forbidden-{ord(c):x}") for c in "\"&':<>"),
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(text)


def test_invalid_jid_is_a_value_error() -> None:
    assert issubclass(InvalidJID, ValueError)


@pytest.mark.parametrize("part", ["local", "domain", "resource"])
def test_each_part_holds_at_most_1023_bytes(part: str) -> None:
    def jid(size: int, char: str = "a") -> str:
        filler = char * size
        parts = {"local": "juliet", "domain": "example.com", "resource": "r"}
        parts[part] = filler
        return f"{parts['local']}@{parts['domain']}/{parts['resource']}"

    assert len(str(JID.parse(jid(1023)))) > 1023
    with pytest.raises(InvalidJID):
        JID.parse(jid(1024))
    # the limit is in bytes of UTF-8, not in characters
    with pytest.raises(InvalidJID):
        JID.parse(jid(512, "\u00e9"))


def test_the_byte_limit_holds_after_case_folding() -> None:
    with pytest.raises(InvalidJID, match="longer than 1023"):
        JID.parse("\u0149" * 400 + "@example.com")  # 800 bytes as sent, 1200 folded


@pytest.mark.parametrize("text", ["jul\x80iet@example.com", "juliet@example.com/bal\x9fcony"])
def test_c1_control_characters_are_refused(text: str) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(text)


@pytest.mark.parametrize("domain", ["exa<mple.com", "example.com'", "a&b", 'x"y'])
def test_domain_must_look_like_a_host(domain: str) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(f"juliet@{domain}")


def test_local_and_domain_are_case_folded_resource_is_not() -> None:
    assert JID.parse("JULIET@Example.COM/Balcony") == JID.parse("juliet@example.com/Balcony")
    assert JID.parse("juliet@example.com/Balcony") != JID.parse("juliet@example.com/balcony")
    assert JID.parse("Stra\u00dfe@example.com").local == "strasse"  # str.casefold()


def test_equal_jids_hash_alike() -> None:
    table = {JID.parse("Juliet@Example.com/r"): "found"}
    assert table[JID.parse("juliet@example.com/r")] == "found"


def test_str_is_the_canonical_form() -> None:
    assert str(JID.parse("Juliet@Example.COM./Balcony")) == "juliet@example.com/Balcony"
    assert str(JID.parse("Example.com")) == "example.com"
    assert str(JID.parse("example.com/r")) == "example.com/r"


def test_bare_and_is_bare() -> None:
    full = JID.parse("juliet@example.com/balcony")
    assert full.bare == JID.parse("juliet@example.com")
    assert full.bare.is_bare and not full.is_bare
    bare = JID.parse("juliet@example.com")
    assert bare.bare is bare


def test_with_resource_checks_the_resource() -> None:
    bare = JID.parse("juliet@example.com")
    assert str(bare.with_resource("Orchard 2")) == "juliet@example.com/Orchard 2"
    assert bare.with_resource("r").bare == bare
    for bad in ["", "a\x00b", "x" * 1024]:
        with pytest.raises(InvalidJID):
            bare.with_resource(bad)


def test_make_prepares_each_part() -> None:
    assert JID.make("Juliet", "Example.com.", "Balcony") == JID.parse("juliet@example.com/Balcony")
    assert JID.make("", "example.com") == JID.parse("example.com")
    for local, domain, resource in [
        ("ju@liet", "example.com", ""),
        ("juliet", "", ""),
        ("juliet", "exa mple.com", ""),
        ("juliet", "example.com", "a\x01"),
    ]:
        with pytest.raises(InvalidJID):
            JID.make(local, domain, resource)


def test_jids_are_immutable() -> None:
    jid = JID.parse("juliet@example.com")
    with pytest.raises(AttributeError):
        jid.local = "romeo"  # type: ignore[misc]


# --- properties ---------------------------------------------------------------------

LOCAL_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="\"&'/:<>@"
)
DOMAIN_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?", fullmatch=True)
DOMAINS = st.lists(DOMAIN_LABEL, min_size=1, max_size=4).map(".".join)
RESOURCES = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.text(LOCAL_CHARS, min_size=1, max_size=30), DOMAINS, RESOURCES)
def test_made_jids_survive_their_text_form(local: str, domain: str, resource: str) -> None:
    jid = JID.make(local, domain, resource)
    assert JID.parse(str(jid)) == jid
    assert JID.parse(str(jid.bare)) == jid.bare
    assert jid.resource == resource


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_parsing_is_idempotent_on_any_text(text: str) -> None:
    try:
        jid = JID.parse(text)
    except InvalidJID:
        assume(False)
        return
    assert JID.parse(str(jid)) == jid
    assert str(JID.parse(str(jid))) == str(jid)
