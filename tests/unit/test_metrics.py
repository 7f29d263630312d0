"""Prometheus text exposition: exact text, escaping, validation, and the node's series.

Rendered text is read back by a strict parser of format 0.0.4 written here
from the format's description, independent of the renderer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_ha.admin.metrics import (
    CONTENT_TYPE,
    COUNTERS,
    Metric,
    StatusDocument,
    metrics_response,
    node_metrics,
    render,
)
from xmpp_ha.ha.model import State


def sample_status(**node_changes: Any) -> StatusDocument:
    """A status document as GET /status returns it (shared with test_admin_http)."""
    services = {
        name: True
        for name in (
            "client listener",
            "router",
            "session manager",
            "presence engine",
            "authentication",
            "sync agent",
            "store",
        )
    }
    node: dict[str, Any] = {
        "name": "n1",
        "host": "127.0.0.1",
        "c2s_port": 5222,
        "admin_port": 20075,
        "service_port": 22001,
        "state": "Normal",
        "reason": "Normal",
        "recommended_action": "None: the node is healthy.",
        "allowed_actions": ["failover"],
        "peer": "n2",
        "peer_connected": True,
        "services": services,
        "counters": {
            "ActiveJsmSessions": 3,
            "InactiveJsmSessions": 2,
            "JsmSessionsComposed": 0,
            "JsmSessionsClient": 3,
            "JsmSessionsClientInactive": 2,
        },
    }
    node.update(node_changes)
    peer = dict(node, name="n2", peer="n1", c2s_port=5223, admin_port=20076, service_port=22002)
    return {
        "node": node,  # type: ignore[typeddict-item]
        "peer": peer,  # type: ignore[typeddict-item]
        "group": {
            "name": "g1",
            "description": "",
            "ha_enabled": True,
            "mode": "balanced",
            "nodes": ["n1", "n2"],
        },
    }


# --- an independent reader of the text format -----------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape_help(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"\\": "\\", "n": "\n"}[m[1]], text)


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    at = 0
    while at < len(text):
        equals = text.index("=", at)
        name = text[at:equals]
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name), name
        assert text[equals + 1] == '"'
        at, value = equals + 2, []
        while text[at] != '"':
            if text[at] == "\\":
                value.append(_ESCAPES[text[at + 1]])  # any other escape is a KeyError
                at += 2
            else:
                assert text[at] != "\n"
                value.append(text[at])
                at += 1
        assert name not in labels
        labels[name] = "".join(value)
        at += 1
        if at < len(text):
            assert text[at] == ",", text[at:]
            at += 1
    return labels


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    assert text == "" or text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, help_text = line[len("# HELP ") :].split(" ", 1)
            families.setdefault(name, {"samples": []})["help"] = _unescape_help(help_text)
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            assert kind in ("gauge", "counter", "untyped", "summary", "histogram")
            families.setdefault(name, {"samples": []})["type"] = kind
        else:
            matched = _SAMPLE.fullmatch(line)
            assert matched is not None, line
            name = matched[1]
            assert "type" in families[name], "sample before its TYPE line"
            labels = _parse_labels(matched[2]) if matched[2] else {}
            families[name]["samples"].append((labels, float(matched[3])))
    return families


# --- render ---------------------------------------------------------------------


def test_render_exact_text() -> None:
    text = render(
        [
            Metric("up", "Whether it runs.", "gauge", [({"node": "n1"}, 1)]),
            Metric("logins_total", "Logins.", "counter", [({}, 7), ({"node": "n2"}, 0.5)]),
        ]
    )
    assert text == (
        "# HELP up Whether it runs.\n"
        "# TYPE up gauge\n"
        'up{node="n1"} 1\n'
        "# HELP logins_total Logins.\n"
        "# TYPE logins_total counter\n"
        "logins_total 7\n"
        'logins_total{node="n2"} 0.5\n'
    )


def test_render_nothing() -> None:
    assert render([]) == ""
    assert render([Metric("empty", "No samples.", "gauge")]) == (
        "# HELP empty No samples.\n# TYPE empty gauge\n"
    )


def test_label_values_and_help_are_escaped() -> None:
    nasty = 'back\\slash "quoted"\nnew line, {braces}=é'
    text = render([Metric("m", "help with \\ and\nnewline", "gauge", [({"v": nasty}, 1)])])
    assert 'm{v="back\\\\slash \\"quoted\\"\\nnew line, {braces}=é"} 1\n' in text
    assert "# HELP m help with \\\\ and\\nnewline\n" in text
    family = parse_exposition(text)["m"]
    assert family["help"] == "help with \\ and\nnewline"
    assert family["samples"] == [({"v": nasty}, 1.0)]


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (0, "0"),
        (3, "3"),
        (True, "1"),
        (-2.0, "-2"),
        (0.25, "0.25"),
        (1e20, "1e+20"),
        (2.0**53, "9007199254740992.0"),
        (math.nan, "NaN"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_values(value: float, written: str) -> None:
    assert render([Metric("m", "h", "gauge", [({}, value)])]).endswith(f"m {written}\n")


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a{b}"])
def test_invalid_metric_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        Metric(name, "h", "gauge")


@pytest.mark.parametrize("label", ["", "1a", "a-b", "__reserved", "a:b"])
def test_invalid_label_names(label: str) -> None:
    with pytest.raises(ValueError, match="invalid label name"):
        Metric("m", "h", "gauge", [({label: "x"}, 1)])


def test_other_invalid_metrics() -> None:
    with pytest.raises(ValueError, match="gauge or counter"):
        Metric("m", "h", "summary", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two samples"):
        Metric("m", "h", "gauge", [({"a": "1", "b": "2"}, 1), ({"b": "2", "a": "1"}, 2)])
    with pytest.raises(ValueError, match="UTF-8"):
        Metric("m", "h", "gauge", [({"a": "\ud800"}, 1)])
    with pytest.raises(ValueError, match="not a number"):
        Metric("m", "h", "gauge", [({}, "1")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="given twice"):
        render([Metric("m", "h", "gauge"), Metric("m", "h", "counter")])
    assert Metric("ns:sub_name", "colons are legal", "gauge").name == "ns:sub_name"


@given(
    st.dictionaries(
        st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,8}", fullmatch=True),
        st.text(st.characters(blacklist_categories=["Cs"]), max_size=30),
        max_size=4,
    ),
    st.floats(allow_nan=False),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
)
def test_round_trip(labels: dict[str, str], value: float, help_text: str) -> None:
    text = render([Metric("m", help_text, "gauge", [(labels, value)])])
    family = parse_exposition(text)["m"]
    assert family["help"] == help_text
    assert family["samples"] == [(labels, value)]


# --- the node's series ----------------------------------------------------------


def _families(status: StatusDocument) -> dict[str, dict[str, Any]]:
    return parse_exposition(render(node_metrics(status)))


def test_node_metrics_counters() -> None:
    families = _families(sample_status())
    for counter, (name, _help) in COUNTERS.items():
        assert families[name]["type"] == "gauge"
        expected = sample_status()["node"]["counters"][counter]
        assert families[name]["samples"] == [({"node": "n1"}, expected)]
    assert set(families) == {name for name, _ in COUNTERS.values()} | {
        "xmpp_ha_node_state",
        "xmpp_ha_critical_service_up",
        "xmpp_ha_peer_connected",
    }


def test_node_state_is_one_hot_over_every_state() -> None:
    status = sample_status(state="Idle", reason="On Admin Request")
    samples = _families(status)["xmpp_ha_node_state"]["samples"]
    assert [labels["state"] for labels, _ in samples] == [state.value for state in State]
    on = [(labels, value) for labels, value in samples if value == 1]
    assert on == [({"node": "n1", "state": "Idle", "reason": "On Admin Request"}, 1.0)]
    assert all(labels["reason"] == "" for labels, value in samples if value == 0)


def test_node_state_outside_the_enum_is_still_shown() -> None:
    samples = _families(sample_status(state="Bogus"))["xmpp_ha_node_state"]["samples"]
    assert len(samples) == len(State) + 1
    assert samples[-1] == ({"node": "n1", "state": "Bogus", "reason": "Normal"}, 1.0)
    assert sum(value for _, value in samples) == 1


def test_services_and_peer_link() -> None:
    status = sample_status(peer_connected=False)
    status["node"]["services"]["router"] = False
    families = _families(status)
    services = dict(
        (labels["service"], value)
        for labels, value in families["xmpp_ha_critical_service_up"]["samples"]
    )
    assert services["router"] == 0 and services["client listener"] == 1
    assert len(services) == 7
    assert families["xmpp_ha_peer_connected"]["samples"] == [({"node": "n1"}, 0.0)]


def test_missing_counter_has_no_sample() -> None:
    status = sample_status()
    del status["node"]["counters"]["JsmSessionsComposed"]
    families = _families(status)
    assert families["xmpp_ha_jsm_sessions_composed"]["samples"] == []


def test_hostile_node_name_is_escaped() -> None:
    status = sample_status(name='n"1\\\n')
    family = _families(status)["xmpp_ha_peer_connected"]
    assert family["samples"] == [({"node": 'n"1\\\n'}, 1.0)]


def test_metrics_response() -> None:
    response = metrics_response(sample_status())
    assert response.status == 200
    assert response.content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert b'xmpp_ha_active_jsm_sessions{node="n1"} 3\n' in response.body
