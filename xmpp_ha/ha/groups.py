"""Presence redundancy groups, SRM parameters and user assignment, as pure rules.

What the administrator may configure (SPEC §1, §4, §5) and how users are
placed on nodes, with no I/O: the store (`xmpp_ha.store.cluster`) calls these
and persists the result.

Rules:
- Group names: 1..128 ASCII letters, digits, `_`, `-`. Descriptions: at most
  128 characters, none of `" % & / < >` and no control characters. A group
  holds one node or two different nodes; a node belongs to at most one group;
  both members run the same software version.
- Every SRM parameter has the SPEC's default; a set of parameters is checked
  when it is built (`SRMParams(...)` raises ParamError), so an invalid one
  never exists. Durations are seconds (float), ports integers.
- Client re-login limits are per node (`ReloginLimits`), not cluster-wide.
- Assignment never looks at anything but its arguments: the same input gives
  the same placement, so two nodes computing it agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from xmpp_ha.ha.srm import GroupRecord, Move

GROUP_NAME_MAX = 128
DESCRIPTION_MAX = 128
NODE_NAME_MAX = 128
SOFTWARE_VERSION_MAX = 64
MAX_GROUP_NODES = 2
FORBIDDEN_IN_DESCRIPTION = '"%&/<>'

_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")
_NODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class GroupError(ValueError):
    """A group, node or assignment request the rules refuse; the message says why."""


class NoSuchGroup(GroupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no group named {name!r}")
        self.name = name


class NoSuchNode(GroupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"node {name!r} is not registered")
        self.name = name


class ParamError(ValueError):
    """An SRM parameter or re-login limit the rules refuse; the message says why."""


# --- names --------------------------------------------------------------------


def validate_group_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise GroupError("group name must not be empty")
    if len(name) > GROUP_NAME_MAX:
        raise GroupError(f"group name is {len(name)} characters long; at most {GROUP_NAME_MAX}")
    if not _GROUP_NAME.fullmatch(name):
        bad = next(char for char in name if not _GROUP_NAME.fullmatch(char))
        raise GroupError(
            f"group name {name!r} contains {bad!r}; use only letters, digits, '_' and '-'"
        )
    return name


def validate_description(description: str) -> str:
    if not isinstance(description, str):
        raise GroupError("group description must be text")
    if len(description) > DESCRIPTION_MAX:
        raise GroupError(
            f"group description is {len(description)} characters long; at most {DESCRIPTION_MAX}"
        )
    for char in description:
        if char in FORBIDDEN_IN_DESCRIPTION:
            raise GroupError(
                f"group description must not contain {char!r}"
                f" (forbidden: {' '.join(FORBIDDEN_IN_DESCRIPTION)})"
            )
        if not char.isprintable() and char != " ":
            raise GroupError(f"group description must not contain control character {char!r}")
    return description


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise GroupError("node name must not be empty")
    if len(name) > NODE_NAME_MAX:
        raise GroupError(f"node name is {len(name)} characters long; at most {NODE_NAME_MAX}")
    if not _NODE_NAME.fullmatch(name):
        raise GroupError(f"node name {name!r} may hold only letters, digits, '_', '-' and '.'")
    return name


def validate_software_version(version: str) -> str:
    if not isinstance(version, str) or not version.strip():
        raise GroupError("software version must not be empty")
    if len(version) > SOFTWARE_VERSION_MAX:
        raise GroupError(f"software version is longer than {SOFTWARE_VERSION_MAX} characters")
    return version


def validate_port(what: str, port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GroupError(f"{what} must be a port number in 1..65535, got {port!r}")
    return port


def check_member_shape(group: str, nodes: Sequence[str]) -> tuple[str, ...]:
    """One node, or two different ones; GroupError otherwise."""
    if isinstance(nodes, str) or not all(isinstance(node, str) for node in nodes):
        raise GroupError(f"the nodes of group {group!r} must be a list of node names")
    if not 1 <= len(nodes) <= MAX_GROUP_NODES:
        raise GroupError(f"group {group!r} needs one or two nodes, got {len(nodes)}")
    if len(nodes) == 2 and nodes[0] == nodes[1]:
        raise GroupError(
            f"the two members of group {group!r} must be different nodes, got {nodes[0]!r} twice"
        )
    return tuple(nodes)


def check_members(
    group: str,
    nodes: Sequence[str],
    *,
    versions: Mapping[str, str],
    member_of: Mapping[str, str],
) -> tuple[str, ...]:
    """The group's members, or GroupError.

    `versions` maps every registered node to its software version; `member_of`
    maps nodes already in a group to that group's name.
    """
    nodes = check_member_shape(group, nodes)
    for node in nodes:
        if node not in versions:
            raise NoSuchNode(node)
        other = member_of.get(node)
        if other is not None and other != group:
            raise GroupError(f"node {node!r} already belongs to group {other!r}")
    if len(nodes) == 2 and versions[nodes[0]] != versions[nodes[1]]:
        raise GroupError(
            f"the members of group {group!r} must run the same software version:"
            f" {nodes[0]!r} runs {versions[nodes[0]]!r}, {nodes[1]!r} runs {versions[nodes[1]]!r}"
        )
    return tuple(nodes)


# --- SRM parameters (SPEC §4) -------------------------------------------------------


def _check_types(cls: type[Any], values: Mapping[str, Any]) -> None:
    kinds = {item.name: item.type for item in fields(cls)}
    for key, value in values.items():
        kind = kinds[key]
        if kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"{key} must be true or false, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(f"{key} must be an integer port number, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(f"{key} must be a number of seconds, got {value!r}")


def _unknown(cls: type[Any], keys: Iterable[str], per_node: Iterable[str] = ()) -> None:
    known = {item.name for item in fields(cls)}
    per_node = set(per_node)
    for key in keys:
        if key in per_node:
            raise ParamError(
                f"{key} is a per-node parameter; set it on the node (re-login limits), "
                "not cluster-wide"
            )
        if key not in known:
            raise ParamError(f"unknown parameter {key!r} (known: {', '.join(sorted(known))})")


def _positive(values: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = values[key]
        if not math.isfinite(value) or value <= 0:
            raise ParamError(f"{key} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class SRMParams:
    """The cluster-wide SRM parameters of SPEC §4, with its defaults."""

    service_port: int = 22001  # peer link: heartbeats between the two SRMs
    admin_rpc_port: int = 20075  # admin requests to the SRM
    critical_service_down_delay: float = 90.0  # a critical service may be down this long
    enable_automatic_fallback: bool = False  # move users home when the primary is healthy
    automatic_fallback_delay: float = 1800.0  # ... for this long (the model's 30 minutes)
    initialization_heartbeat_timeout: float = 120.0  # heartbeat loss tolerated at start-up
    heartbeat_timeout: float = 60.0  # heartbeat loss tolerated before failover
    heartbeat_interval: float = 15.0  # how often a heartbeat goes to the peer
    monitor_authentication_service: bool = False  # auth failure also triggers failover

    def __post_init__(self) -> None:
        values = asdict(self)
        _check_types(SRMParams, values)
        for item in fields(self):
            if item.type == "float":
                object.__setattr__(self, item.name, float(getattr(self, item.name)))
        self.validate()

    def validate(self) -> None:
        """Raise ParamError unless the parameters make sense together."""
        values = asdict(self)
        for key in ("service_port", "admin_rpc_port"):
            if not 1 <= values[key] <= 65535:
                raise ParamError(f"{key} must be a port number in 1..65535, got {values[key]}")
        if self.service_port == self.admin_rpc_port:
            raise ParamError(
                f"service_port and admin_rpc_port must differ (both {self.service_port})"
            )
        _positive(
            values,
            "critical_service_down_delay",
            "automatic_fallback_delay",
            "initialization_heartbeat_timeout",
            "heartbeat_timeout",
            "heartbeat_interval",
        )
        if not self.heartbeat_interval < self.heartbeat_timeout:
            raise ParamError(
                f"heartbeat_interval ({self.heartbeat_interval:g} s) must be shorter than"
                f" heartbeat_timeout ({self.heartbeat_timeout:g} s)"
            )
        if not self.heartbeat_timeout <= self.initialization_heartbeat_timeout:
            raise ParamError(
                f"heartbeat_timeout ({self.heartbeat_timeout:g} s) must not exceed"
                f" initialization_heartbeat_timeout ({self.initialization_heartbeat_timeout:g} s)"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: SRMParams | None = None) -> SRMParams:
        """`base` (default: the defaults) with `values` applied; ParamError names what is wrong."""
        if not isinstance(values, Mapping):
            raise ParamError(f"SRM parameters must be a mapping, got {type(values).__name__}")
        _unknown(cls, values, per_node=ReloginLimits.KEYS.values())
        _check_types(cls, values)
        merged = asdict(base if base is not None else cls())
        merged.update(values)
        return cls(**merged)

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ReloginLimits:
    """One node's client re-login window (SPEC §4, §9): the standby delay is drawn in it."""

    lower: float = 120.0  # least time a client waits before logging in again to this node
    upper: float = 537.0  # most time a client waits before logging in again to this node

    # the administrator's names for the two fields
    KEYS: ClassVar[dict[str, str]] = {
        "lower": "client_relogin_lower",
        "upper": "client_relogin_upper",
    }

    def __post_init__(self) -> None:
        for attribute, key in self.KEYS.items():
            value = getattr(self, attribute)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ParamError(f"{key} must be a number of seconds, got {value!r}")
            object.__setattr__(self, attribute, float(value))
        self.validate()

    def validate(self) -> None:
        for attribute, key in self.KEYS.items():
            value = getattr(self, attribute)
            if not math.isfinite(value) or value <= 0:
                raise ParamError(f"{key} must be a positive number of seconds, got {value!r}")
        if self.lower > self.upper:
            raise ParamError(
                f"client_relogin_lower ({self.lower:g} s) must not exceed"
                f" client_relogin_upper ({self.upper:g} s)"
            )

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: ReloginLimits | None = None
    ) -> ReloginLimits:
        """Keys `client_relogin_lower` / `client_relogin_upper` applied to `base`."""
        by_key = {key: attribute for attribute, key in cls.KEYS.items()}
        for key in values:
            if key not in by_key:
                raise ParamError(
                    f"unknown per-node parameter {key!r} (known: {', '.join(sorted(by_key))})"
                )
        current = base if base is not None else cls()
        merged = {"lower": current.lower, "upper": current.upper}
        merged.update({by_key[key]: value for key, value in values.items()})
        return cls(**merged)

    def to_mapping(self) -> dict[str, float]:
        return {key: getattr(self, attribute) for attribute, key in self.KEYS.items()}


# --- user assignment (SPEC §5) ------------------------------------------------------


class AssignmentMode(Enum):
    BALANCED = "balanced"  # users spread evenly over the group's nodes (the default)
    ACTIVE_STANDBY = "active-standby"  # every user on the group's first node
    NONE = "none"  # the sync agent assigns nobody

    @classmethod
    def parse(cls, text: str) -> AssignmentMode:
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(mode.value for mode in cls)
            raise ParamError(f"unknown user assignment mode {text!r} (known: {known})") from None


DEFAULT_ASSIGNMENT_MODE = AssignmentMode.BALANCED


def plan_assignment(
    mode: AssignmentMode, group_nodes: Sequence[str], current_counts: Mapping[str, int]
) -> str | None:
    """The home node for a new user, given how many users each node is home to.

    balanced: the node with the fewest, ties to the earlier node; active-standby:
    the first node; none (or no nodes): None.
    """
    if mode is AssignmentMode.NONE or not group_nodes:
        return None
    if mode is AssignmentMode.ACTIVE_STANDBY:
        return group_nodes[0]
    return min(group_nodes, key=lambda node: (current_counts.get(node, 0), group_nodes.index(node)))


def rebalance(
    mode: AssignmentMode,
    users_by_home: Mapping[str | None, Iterable[str]],
    group_nodes: Sequence[str] | None = None,
) -> dict[str, str]:
    """The users whose home must change to follow `mode`, with their new home.

    `users_by_home` maps a home node to its users; `group_nodes` are the nodes
    to place users on, first node first (default: the keys of `users_by_home`
    that are not None, in order). Users homed elsewhere (another node, or
    None) are placed as well. As few users move as possible: balanced keeps
    every node within one user of the others, giving the extra users to the
    nodes that already hold the most; the users that move are the last ones
    in name order. none moves nobody.
    """
    nodes = list(group_nodes) if group_nodes is not None else [n for n in users_by_home if n]
    if mode is AssignmentMode.NONE or not nodes:
        return {}
    holding = {node: sorted(users_by_home.get(node, ())) for node in nodes}
    strays = sorted(
        user for home, users in users_by_home.items() if home not in holding for user in users
    )
    if mode is AssignmentMode.ACTIVE_STANDBY:
        first = nodes[0]
        moving = strays + [user for node in nodes[1:] for user in holding[node]]
        return {user: first for user in sorted(moving)}
    total = sum(len(users) for users in holding.values()) + len(strays)
    share, extra = divmod(total, len(nodes))
    # The nodes that already hold the most keep the extra users: fewer moves.
    by_size = sorted(nodes, key=lambda node: (-len(holding[node]), nodes.index(node)))
    target = {node: share + (1 if rank < extra else 0) for rank, node in enumerate(by_size)}
    spare = list(strays)
    for node in nodes:
        surplus = len(holding[node]) - target[node]
        if surplus > 0:
            spare += holding[node][-surplus:]
    moves: dict[str, str] = {}
    for node in nodes:
        for _ in range(target[node] - len(holding[node])):
            moves[spare.pop()] = node
    return moves


def serving_nodes(groups: Iterable[tuple[Sequence[str], GroupRecord]]) -> dict[str, str]:
    """Node -> the node that serves its users now, for nodes not serving their own.

    From each group's members (first node first) and failover record: a node
    being taken over (or all of whose group is being taken by its peer) is
    served by the taker; a failed-over node by its peer. A give-back in
    progress already counts as served by the owner.
    """
    serving: dict[str, str] = {}
    for members, record in groups:
        if len(members) != 2:
            continue
        first, second = members
        peer_of = {first: second, second: first}
        mover = record.transition_node
        if record.transition in (Move.TAKE_OVER, Move.TAKE_ALL) and mover in peer_of:
            serving[peer_of[mover]] = mover
        elif record.transition is None and record.failed_over in peer_of:
            serving[record.failed_over] = peer_of[record.failed_over]
    return serving
