"""XMPP error conditions (RFC 6120 §4.9.3 and §8.3.3) as typed exceptions.

A `StreamError` closes one stream; a `StanzaError` answers one stanza and never
kills its stream. `RemoteProtocolError` means the peer misbehaved;
`LocalProtocolError` means our own code asked for something impossible.
"""

from __future__ import annotations

from enum import Enum

STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class StreamCondition(Enum):
    BAD_FORMAT = "bad-format"
    BAD_NAMESPACE_PREFIX = "bad-namespace-prefix"
    CONFLICT = "conflict"  # a newer session took this full JID
    CONNECTION_TIMEOUT = "connection-timeout"
    HOST_UNKNOWN = "host-unknown"
    IMPROPER_ADDRESSING = "improper-addressing"
    INTERNAL_SERVER_ERROR = "internal-server-error"
    INVALID_FROM = "invalid-from"
    INVALID_NAMESPACE = "invalid-namespace"
    INVALID_XML = "invalid-xml"
    NOT_AUTHORIZED = "not-authorized"
    NOT_WELL_FORMED = "not-well-formed"
    POLICY_VIOLATION = "policy-violation"
    RESOURCE_CONSTRAINT = "resource-constraint"
    RESTRICTED_XML = "restricted-xml"
    SEE_OTHER_HOST = "see-other-host"
    SYSTEM_SHUTDOWN = "system-shutdown"
    UNDEFINED_CONDITION = "undefined-condition"
    UNSUPPORTED_ENCODING = "unsupported-encoding"
    UNSUPPORTED_FEATURE = "unsupported-feature"
    UNSUPPORTED_STANZA_TYPE = "unsupported-stanza-type"
    UNSUPPORTED_VERSION = "unsupported-version"


class StanzaCondition(Enum):
    """Each condition with its default error type (RFC 6120 §8.3.3)."""

    BAD_REQUEST = ("bad-request", "modify")
    CONFLICT = ("conflict", "cancel")
    FEATURE_NOT_IMPLEMENTED = ("feature-not-implemented", "cancel")
    FORBIDDEN = ("forbidden", "auth")
    GONE = ("gone", "cancel")
    INTERNAL_SERVER_ERROR = ("internal-server-error", "cancel")
    ITEM_NOT_FOUND = ("item-not-found", "cancel")
    JID_MALFORMED = ("jid-malformed", "modify")
    NOT_ACCEPTABLE = ("not-acceptable", "modify")
    NOT_ALLOWED = ("not-allowed", "cancel")
    NOT_AUTHORIZED = ("not-authorized", "auth")
    POLICY_VIOLATION = ("policy-violation", "modify")
    RECIPIENT_UNAVAILABLE = ("recipient-unavailable", "wait")
    REDIRECT = ("redirect", "modify")
    REGISTRATION_REQUIRED = ("registration-required", "auth")
    REMOTE_SERVER_NOT_FOUND = ("remote-server-not-found", "cancel")
    REMOTE_SERVER_TIMEOUT = ("remote-server-timeout", "wait")
    RESOURCE_CONSTRAINT = ("resource-constraint", "wait")
    SERVICE_UNAVAILABLE = ("service-unavailable", "cancel")
    SUBSCRIPTION_REQUIRED = ("subscription-required", "auth")
    UNDEFINED_CONDITION = ("undefined-condition", "cancel")
    UNEXPECTED_REQUEST = ("unexpected-request", "wait")

    @property
    def element_name(self) -> str:
        return self.value[0]

    @property
    def default_type(self) -> str:
        return self.value[1]


class XMPPError(Exception):
    """Base of every protocol error."""


class RemoteProtocolError(XMPPError):
    """The peer sent something the protocol forbids."""


class LocalProtocolError(XMPPError):
    """Our own code asked a protocol object for something impossible in its state."""


class StreamError(RemoteProtocolError):
    def __init__(self, condition: StreamCondition, text: str = "", other_host: str = "") -> None:
        super().__init__(f"{condition.value}: {text}" if text else condition.value)
        self.condition = condition
        self.text = text
        self.other_host = other_host


class StanzaError(XMPPError):
    def __init__(
        self, condition: StanzaCondition, text: str = "", error_type: str | None = None
    ) -> None:
        super().__init__(f"{condition.element_name}: {text}" if text else condition.element_name)
        self.condition = condition
        self.text = text
        self.error_type = error_type or condition.default_type
