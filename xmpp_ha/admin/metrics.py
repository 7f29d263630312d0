"""Prometheus text exposition (format 0.0.4) of a node's status, and that status's schema.

`render` is pure: metrics in, text out. Names and label names are validated
when a `Metric` is built; label values are escaped (backslash, double quote,
newline) and HELP text too (backslash, newline). Values print as integers
when they are whole, else as Python's shortest round-trip repr; NaN and
infinities use Prometheus's spelling.

`node_metrics` turns the document that `GET /status` returns (`StatusDocument`,
below) into this node's series. Only the local node is exported: each node
of a pair is scraped on its own, and the peer's view would count twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from xmpp_ha.admin.http import Response
from xmpp_ha.ha.model import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["gauge", "counter"]
Sample = tuple[dict[str, str], float]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# --- the status document (what GET /status returns) --------------------------


class NodeStatus(TypedDict):
    """One node as the admin API shows it; the same shape for the local node and its peer."""

    name: str
    host: str  # where clients and the peer reach the node
    c2s_port: int
    admin_port: int
    service_port: int  # the peer link (SRM heartbeats)
    state: str  # a `State` value, e.g. "Running in Backup Mode"
    reason: str  # a `Reason` value, e.g. "On Admin Request"
    recommended_action: str  # the administrator's next step (SPEC §8)
    allowed_actions: list[str]  # `Action` values the state allows: "failover", ...
    peer: str | None  # the peer's node name; None for a single-node group
    peer_connected: bool  # the peer link is up
    services: dict[str, bool]  # critical service name -> running
    counters: dict[str, int]  # the SPEC §10 counters, keys as in COUNTERS


class GroupStatus(TypedDict):
    name: str
    description: str
    ha_enabled: bool
    mode: str  # "balanced", "active-standby" or "none"
    nodes: list[str]  # one or two node names, the first is the primary


class StatusDocument(TypedDict):
    node: NodeStatus  # the node that answered
    peer: NodeStatus | None  # as last reported over the peer link; None if never
    group: GroupStatus


# SPEC §10 counter -> (metric name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "ActiveJsmSessions": (
        "xmpp_ha_active_jsm_sessions",
        "Active user sessions on this node.",
    ),
    "InactiveJsmSessions": (
        "xmpp_ha_inactive_jsm_sessions",
        "Sessions of users homed on this node's peer held here.",
    ),
    "JsmSessionsComposed": (
        "xmpp_ha_jsm_sessions_composed",
        "Composed (server-side) sessions.",
    ),
    "JsmSessionsClient": (
        "xmpp_ha_jsm_sessions_client",
        "Active client sessions.",
    ),
    "JsmSessionsClientInactive": (
        "xmpp_ha_jsm_sessions_client_inactive",
        "Inactive (standby) client sessions.",
    ),
}


# --- exposition -----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    type: MetricType
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.type not in ("gauge", "counter"):
            raise ValueError(f"metric {self.name}: type must be gauge or counter")
        _check_text(self.name, "help", self.help)
        seen: set[tuple[tuple[str, str], ...]] = set()
        for labels, value in self.samples:
            for label, label_value in labels.items():
                if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                    raise ValueError(f"metric {self.name}: invalid label name {label!r}")
                _check_text(self.name, f"label {label}", label_value)
            if not isinstance(value, int | float):
                raise ValueError(f"metric {self.name}: value {value!r} is not a number")
            key = tuple(sorted(labels.items()))
            if key in seen:
                raise ValueError(f"metric {self.name}: two samples with labels {labels}")
            seen.add(key)


def _check_text(metric: str, what: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"metric {metric}: {what} is not valid UTF-8") from None


def render(metrics: list[Metric]) -> str:
    """The text exposition of `metrics`, one HELP and TYPE line per family."""
    names: set[str] = set()
    lines: list[str] = []
    for metric in metrics:
        if metric.name in names:
            raise ValueError(f"metric {metric.name} given twice")
        names.add(metric.name)
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for labels, value in metric.samples:
            lines.append(f"{metric.name}{_labels(labels)} {_value(value)}")
    return "".join(line + "\n" for line in lines)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items())
    return "{" + inner + "}"


def _value(value: float) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


# --- the node's series ----------------------------------------------------------


def node_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """This node's series: SPEC §10 counters, one-hot state, services, peer link.

    `status` is a `StatusDocument`; only its "node" entry is read.
    """
    node: Mapping[str, Any] = status["node"]
    name = node["name"]
    metrics: list[Metric] = []
    for counter, (metric_name, help_text) in COUNTERS.items():
        value = node["counters"].get(counter)
        samples: list[Sample] = [] if value is None else [({"node": name}, value)]
        metrics.append(Metric(metric_name, help_text, "gauge", samples))

    states = [state.value for state in State]
    if node["state"] not in states:  # not ours, but say so rather than hide it
        states.append(node["state"])
    metrics.append(
        Metric(
            "xmpp_ha_node_state",
            "1 for the node's SRM state (reason on that series), 0 for every other state.",
            "gauge",
            [
                (
                    {
                        "node": name,
                        "state": state,
                        "reason": node["reason"] if state == node["state"] else "",
                    },
                    1 if state == node["state"] else 0,
                )
                for state in states
            ],
        )
    )
    metrics.append(
        Metric(
            "xmpp_ha_critical_service_up",
            "1 while the critical service runs on the node, else 0.",
            "gauge",
            [
                ({"node": name, "service": service}, 1 if up else 0)
                for service, up in node["services"].items()
            ],
        )
    )
    metrics.append(
        Metric(
            "xmpp_ha_peer_connected",
            "1 while the peer link to the node's group peer is up, else 0.",
            "gauge",
            [({"node": name}, 1 if node["peer_connected"] else 0)],
        )
    )
    return metrics


def metrics_response(status: Mapping[str, Any]) -> Response:
    """`GET /metrics` for a handler: the node's series with the exposition content type."""
    return Response.text(render(node_metrics(status)), content_type=CONTENT_TYPE)
