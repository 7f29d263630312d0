"""The admin web page: one self-contained HTML document, shaped like the model's
"Presence Redundancy Group Configuration" window.

The page holds no data when served. Its script polls `GET status` (a relative
URL) once a second and draws the group and both nodes side by side: name,
host, ports, state, reason, recommended action, counters, critical services
up or down. It offers exactly the actions each node's `allowed_actions` lists
(Failover, Fallback, Recovery), plus Stop/Start per critical service, and
POSTs them with `Authorization: Bearer <token>`; the token is asked for once
and kept in the tab's sessionStorage. Errors from the API are shown as
`HTTP <status>: <error>` in a banner.

Rules the page keeps: every value from the API reaches the DOM through
`textContent` (never `innerHTML`) and every value put into a URL through
`encodeURIComponent`; no external assets; `page_response()` serves it with a
Content-Security-Policy that allows exactly its own inline script and style
(by hash) and connections to its own origin.

The URLs the buttons POST to are `PagePaths`; the defaults are
`nodes/{node}/{action}` (action: failover, fallback, recovery) and
`nodes/{node}/services/{service}/{op}` (op: stop, start), relative to the page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import asdict, dataclass

from xmpp_ha.admin.http import Response
from xmpp_ha.admin.metrics import COUNTERS

POLL_MS = 1000
REQUEST_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class PagePaths:
    """Relative URL templates the page calls; `{x}` is replaced by an encoded value."""

    status: str = "status"  # GET
    action: str = "nodes/{node}/{action}"  # POST; action: failover | fallback | recovery
    service: str = "nodes/{node}/services/{service}/{op}"  # POST; op: stop | start

    def __post_init__(self) -> None:
        needs = {
            "status": set(),
            "action": {"node", "action"},
            "service": {"node", "service", "op"},
        }
        for name, wanted in needs.items():
            template: str = getattr(self, name)
            if template.startswith("/") or "://" in template or "\\" in template:
                raise ValueError(f"page path {name} must be relative: {template!r}")
            found = set(re.findall(r"\{(\w+)\}", template))
            if found != wanted:
                raise ValueError(f"page path {name} needs exactly {sorted(wanted)}: {template!r}")


DEFAULT_PATHS = PagePaths()

_STYLE = """
:root { --ink: #1d2733; --muted: #5b6b7c; --line: #c9d2dc; --panel: #ffffff;
  --bar: #dfe6ee; --ok: #1c7c3a; --bad: #b3261e; --warn: #9a6700; --busy: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); background: #f2f5f8; }
header { display: flex; flex-wrap: wrap; gap: 8px; align-items: center;
  justify-content: space-between; padding: 10px 18px; background: #24364b; color: #fff; }
header h1 { margin: 0; font-size: 17px; font-weight: 600; }
.toolbar { display: flex; gap: 8px; align-items: center; }
.toolbar .muted { color: #c8d3df; }
main { padding: 14px 18px; max-width: 1280px; }
.panel { background: var(--panel); border: 1px solid var(--line); margin-bottom: 14px; }
.panel > h2 { margin: 0; padding: 6px 10px; font-size: 14px; background: var(--bar);
  border-bottom: 1px solid var(--line); }
.panel > .content { padding: 10px; }
dl.grid { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
dl.grid dt { color: var(--muted); }
dl.grid dd { margin: 0; overflow-wrap: anywhere; }
.nodes { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); padding: 10px; background: #fbfcfd; }
.card h3 { margin: 0 0 8px; font-size: 16px; overflow-wrap: anywhere; }
.card h4 { margin: 12px 0 4px; font-size: 13px; color: var(--muted); }
.tag { font-size: 12px; font-weight: normal; color: var(--muted); }
.state { padding: 6px 8px; border-left: 5px solid var(--busy); background: #eef3f9; }
.state .name { font-weight: 600; font-size: 15px; }
.state.ok { border-color: var(--ok); } .state.bad { border-color: var(--bad); }
.state.warn { border-color: var(--warn); } .state.busy { border-color: var(--busy); }
.recommended { margin: 8px 0; }
.actions { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; align-items: center; }
button { font: inherit; padding: 3px 12px; border: 1px solid #7d8b99; background: #f7f9fb;
  border-radius: 3px; cursor: pointer; }
button.primary { background: #24364b; color: #fff; border-color: #24364b; }
button:disabled { opacity: .45; cursor: default; }
table { border-collapse: collapse; width: 100%; }
td { padding: 2px 6px; border-bottom: 1px solid #e4e9ee; overflow-wrap: anywhere; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.control { text-align: right; width: 1%; white-space: nowrap; }
.badge { display: inline-block; min-width: 64px; text-align: center; padding: 0 6px;
  border-radius: 9px; font-size: 12px; color: #fff; }
.badge.up { background: var(--ok); } .badge.down { background: var(--bad); }
.banner { margin: 10px 18px 0; padding: 8px 12px; border: 1px solid; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.banner.error { background: #fdecea; border-color: var(--bad); color: #7a1a14; }
.banner.ok { background: #e9f6ec; border-color: var(--ok); color: #14532a; }
.banner.info { background: #eaf1fb; border-color: var(--busy); color: #173f6d; }
.note { color: var(--muted); font-style: italic; margin: 4px 0; }
[hidden] { display: none !important; }
"""

_SCRIPT = """
"use strict";
(function () {
  const CONFIG = __CONFIG__;
  const TOKEN_KEY = "xmpp-ha-admin-token";
  const ACTIONS = [
    ["failover", "Failover",
     "Fail over node {node}? Its users move to the peer; its critical services stay stopped until a fallback."],
    ["fallback", "Fallback", "Fall back to node {node}? Its users move back to it."],
    ["recovery", "Recovery", "Run recovery? The SRM restarts on both nodes of the group."],
  ];
  const cards = {};
  let lastStatus = null;
  let cardOrder = "";
  let busy = false;
  let tokenAsked = false;

  function byId(id) { return document.getElementById(id); }
  function make(tag, className, text) {
    const element = document.createElement(tag);
    if (className) { element.className = className; }
    if (text !== undefined) { element.textContent = text; }
    return element;
  }
  function shown(value) {
    return value === null || value === undefined || value === "" ? "\\u2014" : String(value);
  }
  function fill(template, values) {
    return template.replace(/\\{(\\w+)\\}/g, function (_, key) {
      return encodeURIComponent(String(values[key]));
    });
  }
  function banner(id, kind, text) {
    const box = byId(id);
    box.className = "banner " + kind;
    box.textContent = text;
    box.hidden = !text;
  }

  function storedToken() { return sessionStorage.getItem(TOKEN_KEY); }
  function askToken() {
    const entered = prompt("Admin token of this node (the node's admin-token file):", "");
    if (entered && entered.trim()) { sessionStorage.setItem(TOKEN_KEY, entered.trim()); }
    return storedToken();
  }

  function ApiError(status, message) { this.status = status; this.message = message; }
  function describe(error) {
    if (error instanceof ApiError) {
      return error.status ? "HTTP " + error.status + ": " + error.message : error.message;
    }
    return String(error && error.message ? error.message : error);
  }

  async function call(method, url) {
    const headers = { "Accept": "application/json" };
    const token = storedToken();
    if (token) { headers["Authorization"] = "Bearer " + token; }
    const controller = new AbortController();
    const timer = setTimeout(function () { controller.abort(); }, CONFIG.timeout_ms);
    let response;
    let text;
    try {
      response = await fetch(url, { method: method, headers: headers, cache: "no-store",
                                    credentials: "omit", signal: controller.signal });
      text = await response.text();
    } catch (error) {
      const why = error && error.name === "AbortError" ? "no answer in time" : describe(error);
      throw new ApiError(0, "admin API unreachable: " + why);
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    if (text) { try { data = JSON.parse(text); } catch (_) { data = null; } }
    if (!response.ok) {
      if (response.status === 401) { sessionStorage.removeItem(TOKEN_KEY); }
      const message = data && typeof data.error === "string"
        ? data.error : (text || response.statusText || "no details");
      throw new ApiError(response.status, message);
    }
    return data;
  }

  function stateKind(state) {
    if (state === "Normal") { return "ok"; }
    if (state === "Running in Backup Mode") { return "warn"; }
    if (["Idle", "Failed Over", "Failed Over with Critical Services Not Running",
         "Running in Failed Mode", "Unknown"].indexOf(state) >= 0) { return "bad"; }
    return "busy";
  }

  function field(list, label) {
    list.appendChild(make("dt", "", label));
    return list.appendChild(make("dd", "", "\\u2014"));
  }

  function buildCard(slot) {
    const card = { slot: slot, info: null, serviceKeys: null, services: {}, counters: {},
                   actions: {} };
    card.root = make("article", "card");
    const title = card.root.appendChild(make("h3"));
    card.name = title.appendChild(make("span", "", "\\u2014"));
    title.appendChild(make("span", "tag", slot === "node" ? "  (this node)" : "  (peer)"));
    card.empty = card.root.appendChild(make("p", "note"));
    card.body = card.root.appendChild(make("div"));
    card.stale = card.body.appendChild(
      make("p", "note", "Peer link down: last report from the peer."));
    card.stateBox = card.body.appendChild(make("div", "state"));
    card.state = card.stateBox.appendChild(make("div", "name", "\\u2014"));
    card.reason = card.stateBox.appendChild(make("div", "", ""));
    const recommended = card.body.appendChild(make("p", "recommended"));
    recommended.appendChild(make("strong", "", "Recommended action: "));
    card.recommended = recommended.appendChild(make("span", "", "\\u2014"));
    const actions = card.body.appendChild(make("div", "actions"));
    for (const [action, label, question] of ACTIONS) {
      const button = actions.appendChild(make("button", "primary", label));
      button.type = "button";
      button.addEventListener("click", function () {
        if (!card.info) { return; }
        const node = card.info.name;
        act(label + " of " + node, fill(CONFIG.paths.action, { node: node, action: action }),
            question.replace("{node}", node));
      });
      card.actions[action] = button;
    }
    card.noActions = actions.appendChild(make("span", "note", "No action is offered in this state."));
    const details = card.body.appendChild(make("dl", "grid"));
    card.host = field(details, "Host");
    card.c2sPort = field(details, "Client port");
    card.adminPort = field(details, "Admin port");
    card.servicePort = field(details, "Service port");
    card.peerLink = field(details, "Peer link");
    card.body.appendChild(make("h4", "", "Counters"));
    const counters = card.body.appendChild(make("table")).appendChild(make("tbody"));
    for (const name of CONFIG.counters) {
      const row = counters.appendChild(make("tr"));
      row.appendChild(make("td", "", name));
      card.counters[name] = row.appendChild(make("td", "number", "\\u2014"));
    }
    card.body.appendChild(make("h4", "", "Critical services"));
    card.serviceRows = card.body.appendChild(make("table")).appendChild(make("tbody"));
    return card;
  }

  function buildServiceRows(card, names) {
    card.services = {};
    const rows = [];
    for (const name of names) {
      const row = make("tr");
      row.appendChild(make("td", "", name));
      const badge = row.appendChild(make("td")).appendChild(make("span", "badge"));
      const button = row.appendChild(make("td", "control")).appendChild(make("button"));
      button.type = "button";
      const entry = { badge: badge, button: button, op: "stop" };
      button.addEventListener("click", function () {
        if (!card.info) { return; }
        const node = card.info.name;
        const op = entry.op;
        const question = op === "stop"
          ? "Stop critical service '" + name + "' on node " + node + "? This can start a failover."
          : "Start critical service '" + name + "' on node " + node + "?";
        act((op === "stop" ? "Stop " : "Start ") + name + " on " + node,
            fill(CONFIG.paths.service, { node: node, service: name, op: op }), question);
      });
      card.services[name] = entry;
      rows.push(row);
    }
    card.serviceRows.replaceChildren(...rows);
  }

  function updateCard(card, info, status) {
    card.info = info || null;
    if (!info) {
      const peerName = status.node && status.node.peer;
      card.name.textContent = shown(card.slot === "peer" ? peerName : null);
      card.empty.textContent = card.slot === "peer" && !peerName
        ? "Single-node group: no peer." : "No report from this node yet.";
      card.empty.hidden = false;
      card.body.hidden = true;
      return;
    }
    card.empty.hidden = true;
    card.body.hidden = false;
    card.name.textContent = shown(info.name);
    card.stale.hidden = !(card.slot === "peer" && status.node && !status.node.peer_connected);
    card.stateBox.className = "state " + stateKind(info.state);
    card.state.textContent = shown(info.state);
    card.reason.textContent = "Reason: " + shown(info.reason);
    card.recommended.textContent = shown(info.recommended_action);
    card.host.textContent = shown(info.host);
    card.c2sPort.textContent = shown(info.c2s_port);
    card.adminPort.textContent = shown(info.admin_port);
    card.servicePort.textContent = shown(info.service_port);
    card.peerLink.textContent = info.peer_connected ? "connected" : "not connected";
    const allowed = Array.isArray(info.allowed_actions) ? info.allowed_actions : [];
    let offered = 0;
    for (const [action] of ACTIONS) {
      const button = card.actions[action];
      button.hidden = allowed.indexOf(action) < 0;
      button.disabled = busy;
      if (!button.hidden) { offered += 1; }
    }
    card.noActions.hidden = offered > 0;
    const counters = info.counters || {};
    for (const name of CONFIG.counters) { card.counters[name].textContent = shown(counters[name]); }
    const services = info.services || {};
    const names = Object.keys(services);
    if (names.join("\\n") !== card.serviceKeys) {
      buildServiceRows(card, names);
      card.serviceKeys = names.join("\\n");
    }
    for (const name of names) {
      const entry = card.services[name];
      const up = services[name] === true;
      entry.badge.className = "badge " + (up ? "up" : "down");
      entry.badge.textContent = up ? "running" : "stopped";
      entry.op = up ? "stop" : "start";
      entry.button.textContent = up ? "Stop" : "Start";
      entry.button.disabled = busy;
    }
  }

  function render(status) {
    const group = status.group || {};
    byId("group-name").textContent = shown(group.name);
    byId("group-description").textContent = shown(group.description);
    byId("group-nodes").textContent = Array.isArray(group.nodes) ? group.nodes.join(", ") : "\\u2014";
    byId("group-ha").textContent = group.ha_enabled ? "On" : "Off";
    byId("group-mode").textContent = shown(group.mode);
    const members = Array.isArray(group.nodes) ? group.nodes : [];
    const slots = [["node", status.node], ["peer", status.peer]];
    const peerName = status.node ? status.node.peer : null;
    const rank = function (entry) {  // group order: the primary first
      const name = entry[1] ? entry[1].name : (entry[0] === "peer" ? peerName : null);
      const at = members.indexOf(name);
      return at >= 0 ? at : (entry[0] === "node" ? 0.5 : 1.5);
    };
    slots.sort(function (a, b) { return rank(a) - rank(b); });
    for (const [slot] of slots) { if (!cards[slot]) { cards[slot] = buildCard(slot); } }
    const order = slots.map(function (entry) { return entry[0]; }).join(",");
    if (order !== cardOrder) {  // move cards only when the order changes: keeps focus and clicks
      byId("nodes").replaceChildren(cards[slots[0][0]].root, cards[slots[1][0]].root);
      cardOrder = order;
    }
    for (const [slot, info] of slots) { updateCard(cards[slot], info, status); }
    lastStatus = status;
  }

  async function act(label, url, question) {
    if (busy || !confirm(question)) { return; }
    if (!storedToken() && !askToken()) {
      banner("action-result", "error", label + ": not sent, the admin token is needed.");
      return;
    }
    busy = true;
    if (lastStatus) { render(lastStatus); }
    banner("action-result", "info", label + ": sending\\u2026");
    try {
      const result = await call("POST", url);
      const detail = result && typeof result.message === "string" ? result.message : "accepted";
      banner("action-result", "ok", label + ": " + detail);
    } catch (error) {
      banner("action-result", "error", label + " failed: " + describe(error));
    } finally {
      busy = false;
      if (lastStatus) { render(lastStatus); }
    }
  }

  async function poll() {
    try {
      const status = await call("GET", CONFIG.paths.status);
      render(status);
      banner("conn-error", "error", "");
      byId("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (error) {
      banner("conn-error", "error", "Status unavailable: " + describe(error));
      byId("updated").textContent = lastStatus ? "Showing the last status received" : "No status";
      if ((error.status === 401 || error.status === 403) && !tokenAsked) {
        tokenAsked = true;
        askToken();
      }
    } finally {
      setTimeout(poll, CONFIG.poll_ms);
    }
  }

  byId("set-token").addEventListener("click", function () {
    tokenAsked = true;
    if (askToken()) { banner("action-result", "ok", "Admin token kept for this tab."); }
  });
  byId("forget-token").addEventListener("click", function () {
    sessionStorage.removeItem(TOKEN_KEY);
    banner("action-result", "ok", "Admin token forgotten.");
  });
  poll();
})();
"""

_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>xmpp-ha: presence redundancy group</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>Presence Redundancy Group Configuration</h1>
  <div class="toolbar">
    <span id="updated" class="muted">Connecting&hellip;</span>
    <button type="button" id="set-token">Set admin token</button>
    <button type="button" id="forget-token">Forget token</button>
  </div>
</header>
<div id="conn-error" class="banner error" role="alert" hidden></div>
<div id="action-result" class="banner" role="status" hidden></div>
<main>
  <section class="panel">
    <h2>Presence Redundancy Group Information</h2>
    <div class="content">
      <dl class="grid">
        <dt>Name</dt><dd id="group-name">&mdash;</dd>
        <dt>Description</dt><dd id="group-description">&mdash;</dd>
        <dt>Presence servers</dt><dd id="group-nodes">&mdash;</dd>
        <dt>High availability</dt><dd id="group-ha">&mdash;</dd>
        <dt>User assignment mode</dt><dd id="group-mode">&mdash;</dd>
      </dl>
    </div>
  </section>
  <section class="panel">
    <h2>High Availability: Monitored Servers</h2>
    <div class="content"><div id="nodes" class="nodes"></div></div>
  </section>
</main>
<script>__SCRIPT__</script>
</body>
</html>
"""


def _script(paths: PagePaths) -> str:
    config = {
        "paths": asdict(paths),
        "counters": list(COUNTERS),
        "poll_ms": POLL_MS,
        "timeout_ms": REQUEST_TIMEOUT_MS,
    }
    # "<" never appears raw, so nothing in the data can close the <script> element.
    literal = json.dumps(config, separators=(",", ":")).replace("<", "\\u003c")
    return _SCRIPT.replace("__CONFIG__", literal)


def render_page(paths: PagePaths = DEFAULT_PATHS) -> str:
    """The whole page: HTML with inline CSS and JS, no external assets, no data."""
    return _HTML.replace("__STYLE__", _STYLE).replace("__SCRIPT__", _script(paths))


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(paths: PagePaths = DEFAULT_PATHS) -> str:
    """A CSP admitting exactly the page's inline script and style, and fetches to its origin."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256(_script(paths))}",
            f"style-src {_sha256(_STYLE)}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def page_response(paths: PagePaths = DEFAULT_PATHS) -> Response:
    """`GET /` for a handler: the page with its security headers."""
    response = Response.html(render_page(paths))
    response.headers["Content-Security-Policy"] = content_security_policy(paths)
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response
