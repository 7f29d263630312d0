"""XML namespaces used on the wire, in one place."""

CLIENT = "jabber:client"
STREAM = "http://etherx.jabber.org/streams"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"
SM = "urn:xmpp:sm:3"
ROSTER = "jabber:iq:roster"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
PING = "urn:xmpp:ping"
CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
DELAY = "urn:xmpp:delay"
RECEIPTS = "urn:xmpp:receipts"  # XEP-0184 message delivery receipts
VERSION = "jabber:iq:version"
XML = "http://www.w3.org/XML/1998/namespace"
DUAL = "urn:xmpp-ha:dual:0"  # dual connections (docs/dual-connections.md)


def tag(namespace: str, local: str) -> str:
    """The ElementTree name `{namespace}local`."""
    return f"{{{namespace}}}{local}"


def namespace_of(name: str) -> str:
    """The namespace of an ElementTree name (`{namespace}local`), "" when it has none."""
    return name[1 : name.index("}")] if name.startswith("{") else ""
