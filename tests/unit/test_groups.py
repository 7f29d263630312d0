"""The pure rules of redundancy groups: names, members, SRM parameters, assignment."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_ha.ha.groups import (
    AssignmentMode,
    GroupError,
    NoSuchGroup,
    NoSuchNode,
    ParamError,
    ReloginLimits,
    SRMParams,
    check_member_shape,
    check_members,
    plan_assignment,
    rebalance,
    serving_nodes,
    validate_description,
    validate_group_name,
    validate_node_name,
    validate_port,
    validate_software_version,
)
from xmpp_ha.ha.srm import GroupRecord, Move

# --- names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["g", "Group_1-east", "A" * 128, "0", "-_-"])
def test_valid_group_names(name: str) -> None:
    assert validate_group_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "group name must not be empty"),
        ("a" * 129, "group name is 129 characters long; at most 128"),
        ("two words", "contains ' '; use only letters, digits, '_' and '-'"),
        ("dot.ted", "contains '.'"),
        ("caf\u00e9", "contains '\u00e9'"),
        ("a/b", "contains '/'"),
    ],
)
def test_invalid_group_names(name: str, message: str) -> None:
    with pytest.raises(GroupError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_group_name(name)


@pytest.mark.parametrize("text", ["", "Pair #1 (east) - HA on; ok?", "x" * 128])
def test_valid_descriptions(text: str) -> None:
    assert validate_description(text) == text


def test_description_symbols_allowed_except_the_six() -> None:
    allowed = "!#$'()*+,-.:;=?@[\\]^_`{|}~ \u00e9\u4e2d"
    assert validate_description(allowed) == allowed


@pytest.mark.parametrize("char", list('"%&/<>'))
def test_description_forbidden_characters(char: str) -> None:
    with pytest.raises(GroupError, match=f"group description must not contain '{char}'"):
        validate_description(f"before {char} after")


def test_description_too_long_and_control_characters() -> None:
    with pytest.raises(GroupError, match="group description is 129 characters long; at most 128"):
        validate_description("d" * 129)
    with pytest.raises(GroupError, match="must not contain control character"):
        validate_description("line\nbreak")


def test_node_names_ports_versions() -> None:
    assert validate_node_name("node-1.example.net") == "node-1.example.net"
    with pytest.raises(GroupError, match="node name must not be empty"):
        validate_node_name("")
    with pytest.raises(GroupError, match="may hold only letters"):
        validate_node_name("n 1")
    with pytest.raises(GroupError, match="at most 128"):
        validate_node_name("n" * 129)
    assert validate_port("c2s_port", 5222) == 5222
    for bad in (0, 65536, -1, True, "5222", 5222.0):
        with pytest.raises(GroupError, match="c2s_port must be a port number in 1..65535"):
            validate_port("c2s_port", bad)
    assert validate_software_version("0.1.0") == "0.1.0"
    with pytest.raises(GroupError, match="software version must not be empty"):
        validate_software_version(" ")
    with pytest.raises(GroupError, match="longer than 64"):
        validate_software_version("1" * 65)


# --- members ------------------------------------------------------------------------

VERSIONS = {"n1": "1.0", "n2": "1.0", "n3": "2.0", "n4": "1.0"}


def test_member_shape() -> None:
    assert check_member_shape("g", ["n1"]) == ("n1",)
    assert check_member_shape("g", ("n1", "n2")) == ("n1", "n2")
    with pytest.raises(GroupError, match="group 'g' needs one or two nodes, got 0"):
        check_member_shape("g", [])
    with pytest.raises(GroupError, match="group 'g' needs one or two nodes, got 3"):
        check_member_shape("g", ["n1", "n2", "n4"])
    with pytest.raises(GroupError, match="must be different nodes, got 'n1' twice"):
        check_member_shape("g", ["n1", "n1"])
    with pytest.raises(GroupError, match="must be a list of node names"):
        check_member_shape("g", "n1")


def test_members() -> None:
    assert check_members("g", ["n1", "n2"], versions=VERSIONS, member_of={}) == ("n1", "n2")
    # re-checking a group against itself is fine
    assert check_members("g", ["n1"], versions=VERSIONS, member_of={"n1": "g"}) == ("n1",)
    with pytest.raises(NoSuchNode, match="node 'n9' is not registered"):
        check_members("g", ["n1", "n9"], versions=VERSIONS, member_of={})
    with pytest.raises(GroupError, match="node 'n2' already belongs to group 'other'"):
        check_members("g", ["n1", "n2"], versions=VERSIONS, member_of={"n2": "other"})
    with pytest.raises(
        GroupError,
        match="must run the same software version: 'n1' runs '1.0', 'n3' runs '2.0'",
    ):
        check_members("g", ["n1", "n3"], versions=VERSIONS, member_of={})


def test_error_types() -> None:
    assert issubclass(GroupError, ValueError)
    assert issubclass(ParamError, ValueError)
    assert str(NoSuchGroup("g")) == "no group named 'g'"
    assert isinstance(NoSuchNode("n"), GroupError)


# --- SRM parameters -------------------------------------------------------------------


def test_srm_defaults_are_the_specs() -> None:
    assert SRMParams().to_mapping() == {
        "service_port": 22001,
        "admin_rpc_port": 20075,
        "critical_service_down_delay": 90.0,
        "enable_automatic_fallback": False,
        "automatic_fallback_delay": 1800.0,
        "initialization_heartbeat_timeout": 120.0,
        "heartbeat_timeout": 60.0,
        "heartbeat_interval": 15.0,
        "monitor_authentication_service": False,
    }
    assert ReloginLimits().to_mapping() == {
        "client_relogin_lower": 120.0,
        "client_relogin_upper": 537.0,
    }


def test_srm_from_mapping_merges_and_converts() -> None:
    small = SRMParams.from_mapping(
        {"heartbeat_interval": 1, "heartbeat_timeout": 3, "initialization_heartbeat_timeout": 5}
    )
    assert small.heartbeat_interval == 1.0 and isinstance(small.heartbeat_interval, float)
    assert small.critical_service_down_delay == 90.0
    again = SRMParams.from_mapping({"enable_automatic_fallback": True}, base=small)
    assert again.heartbeat_timeout == 3.0 and again.enable_automatic_fallback
    assert SRMParams.from_mapping(again.to_mapping()) == again
    assert SRMParams.from_mapping({}) == SRMParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.heartbeat_interval = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hearbeat_interval": 1}, "unknown parameter 'hearbeat_interval' \\(known: "),
        ({"client_relogin_lower": 5}, "client_relogin_lower is a per-node parameter"),
        ({"client_relogin_upper": 5}, "client_relogin_upper is a per-node parameter"),
        ({"heartbeat_interval": "15"}, "heartbeat_interval must be a number of seconds, got '15'"),
        ({"heartbeat_timeout": True}, "heartbeat_timeout must be a number of seconds, got True"),
        ({"heartbeat_timeout": None}, "heartbeat_timeout must be a number of seconds, got None"),
        ({"service_port": 22001.0}, "service_port must be an integer port number, got 22001.0"),
        ({"admin_rpc_port": "1"}, "admin_rpc_port must be an integer port number"),
        ({"enable_automatic_fallback": 1}, "enable_automatic_fallback must be true or false"),
        ({"monitor_authentication_service": "yes"}, "monitor_authentication_service must be true"),
        ({"service_port": 0}, "service_port must be a port number in 1..65535, got 0"),
        ({"admin_rpc_port": 65536}, "admin_rpc_port must be a port number in 1..65535"),
        ({"admin_rpc_port": 22001}, "service_port and admin_rpc_port must differ \\(both 22001\\)"),
        ({"critical_service_down_delay": 0}, "critical_service_down_delay must be a positive"),
        ({"automatic_fallback_delay": -1}, "automatic_fallback_delay must be a positive"),
        ({"heartbeat_interval": float("inf")}, "heartbeat_interval must be a positive"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval must be a positive"),
        (
            {"heartbeat_interval": 60},
            "heartbeat_interval \\(60 s\\) must be shorter than heartbeat_timeout \\(60 s\\)",
        ),
        (
            {"heartbeat_timeout": 121},
            "heartbeat_timeout \\(121 s\\) must not exceed initialization_heartbeat_timeout"
            " \\(120 s\\)",
        ),
        (
            {"initialization_heartbeat_timeout": 30},
            "heartbeat_timeout \\(60 s\\) must not exceed initialization_heartbeat_timeout",
        ),
    ],
)
def test_srm_invalid(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ParamError, match=message):
        SRMParams.from_mapping(changes)


def test_srm_validates_at_construction() -> None:
    with pytest.raises(ParamError, match="must be shorter than heartbeat_timeout"):
        SRMParams(heartbeat_interval=5, heartbeat_timeout=5)
    with pytest.raises(ParamError, match="must be a mapping"):
        SRMParams.from_mapping([("heartbeat_interval", 1)])  # type: ignore[arg-type]
    SRMParams(heartbeat_timeout=120, initialization_heartbeat_timeout=120).validate()  # equal: ok


def test_relogin_limits() -> None:
    assert ReloginLimits(10, 10) == ReloginLimits(10.0, 10.0)
    assert ReloginLimits.from_mapping({"client_relogin_upper": 600}).upper == 600.0
    base = ReloginLimits(1, 2)
    assert ReloginLimits.from_mapping({"client_relogin_lower": 2}, base=base) == ReloginLimits(2, 2)
    with pytest.raises(ParamError, match="client_relogin_lower \\(5 s\\) must not exceed"):
        ReloginLimits(5, 4)
    with pytest.raises(ParamError, match="client_relogin_lower must be a positive"):
        ReloginLimits(0, 4)
    with pytest.raises(ParamError, match="client_relogin_upper must be a number of seconds"):
        ReloginLimits(1, "4")  # type: ignore[arg-type]
    with pytest.raises(ParamError, match="unknown per-node parameter 'lower'"):
        ReloginLimits.from_mapping({"lower": 1})


# --- assignment -----------------------------------------------------------------------


def test_assignment_mode() -> None:
    assert [mode.value for mode in AssignmentMode] == ["balanced", "active-standby", "none"]
    assert AssignmentMode.parse("active-standby") is AssignmentMode.ACTIVE_STANDBY
    with pytest.raises(ParamError, match="unknown user assignment mode 'hot' \\(known: balanced"):
        AssignmentMode.parse("hot")


def test_plan_assignment() -> None:
    nodes = ["n1", "n2"]
    balanced = AssignmentMode.BALANCED
    assert plan_assignment(balanced, nodes, {}) == "n1"
    assert plan_assignment(balanced, nodes, {"n1": 3, "n2": 3}) == "n1"
    assert plan_assignment(balanced, nodes, {"n1": 3, "n2": 2}) == "n2"
    assert plan_assignment(balanced, nodes, {"n1": 1}) == "n2"
    assert plan_assignment(balanced, ["n2", "n1"], {}) == "n2"
    assert plan_assignment(AssignmentMode.ACTIVE_STANDBY, nodes, {"n1": 9}) == "n1"
    assert plan_assignment(AssignmentMode.NONE, nodes, {}) is None
    assert plan_assignment(balanced, [], {}) is None


def test_rebalance_examples() -> None:
    users = [f"u{index:02}" for index in range(10)]
    balanced = AssignmentMode.BALANCED
    moves = rebalance(balanced, {"n1": users, "n2": []})
    assert moves == {user: "n2" for user in users[5:]}
    assert rebalance(balanced, {"n1": users[:5], "n2": users[5:]}) == {}
    # 7/3 -> 5/5: the last two users in name order move
    assert rebalance(balanced, {"n1": users[:7], "n2": users[7:]}) == {"u05": "n2", "u06": "n2"}
    assert rebalance(balanced, {"n1": users[:3], "n2": users[3:10]}) == {"u08": "n1", "u09": "n1"}
    assert rebalance(AssignmentMode.ACTIVE_STANDBY, {"n1": users[:3], "n2": users[3:5]}) == {
        "u03": "n1",
        "u04": "n1",
    }
    assert rebalance(AssignmentMode.NONE, {"n1": users, "n2": []}) == {}
    assert rebalance(balanced, {}, []) == {}
    # users homed elsewhere (unassigned, or a node outside the group) are placed too
    strays = rebalance(balanced, {None: ["a", "b", "c"], "n9": ["d"]}, ["n1", "n2"])
    assert sorted(strays) == ["a", "b", "c", "d"]
    assert sorted(strays.values()) == ["n1", "n1", "n2", "n2"]


def test_rebalance_odd_total_keeps_the_extra_where_most_are() -> None:
    users = [f"u{index}" for index in range(11)]
    # 8/3 -> 6/5 (not 5/6): two moves, not three
    moves = rebalance(AssignmentMode.BALANCED, {"n1": users[:8], "n2": users[8:]})
    assert moves == {"u6": "n2", "u7": "n2"}
    moves = rebalance(AssignmentMode.BALANCED, {"n1": users[:3], "n2": users[3:]})
    assert moves == {"u8": "n1", "u9": "n1"}  # "u10" sorts first


def _minimal_moves(sizes: list[int], strays: int) -> int:
    total = sum(sizes) + strays
    share, extra = divmod(total, len(sizes))
    best = None
    for lucky in itertools.combinations(range(len(sizes)), extra):
        targets = [share + (index in lucky) for index in range(len(sizes))]
        moves = strays + sum(
            max(0, size - target) for size, target in zip(sizes, targets, strict=True)
        )
        best = moves if best is None else min(best, moves)
    assert best is not None
    return best


@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    strays=st.integers(0, 5),
)
def test_rebalance_balanced_is_even_and_minimal(sizes: list[int], strays: int) -> None:
    nodes = [f"n{index}" for index in range(len(sizes))]
    by_home: dict[str | None, list[str]] = {
        node: [f"{node}-u{index}" for index in range(size)]
        for node, size in zip(nodes, sizes, strict=True)
    }
    by_home[None] = [f"stray{index}" for index in range(strays)]
    moves = rebalance(AssignmentMode.BALANCED, by_home, nodes)
    after = {node: set(by_home[node]) for node in nodes}
    for user, new_home in moves.items():
        for users in after.values():
            users.discard(user)
        after[new_home].add(user)
    counts = [len(users) for users in after.values()]
    assert sum(counts) == sum(sizes) + strays
    assert max(counts) - min(counts) <= 1
    assert len(moves) == _minimal_moves(sizes, strays)
    assert rebalance(AssignmentMode.BALANCED, by_home, nodes) == moves  # deterministic


def test_serving_nodes() -> None:
    pair = ("n1", "n2")
    assert serving_nodes([(pair, GroupRecord())]) == {}
    assert serving_nodes([(pair, GroupRecord(failed_over="n1"))]) == {"n1": "n2"}
    taking = GroupRecord(transition=Move.TAKE_OVER, transition_node="n2")
    assert serving_nodes([(pair, taking)]) == {"n1": "n2"}
    all_to_n1 = GroupRecord(failed_over="n1", transition=Move.TAKE_ALL, transition_node="n1")
    assert serving_nodes([(pair, all_to_n1)]) == {"n2": "n1"}
    giving = GroupRecord(failed_over="n1", transition=Move.GIVE_BACK, transition_node="n2")
    assert serving_nodes([(pair, giving)]) == {}
    assert serving_nodes([(("n1",), GroupRecord(failed_over="n1"))]) == {}
    two_groups = [(pair, GroupRecord(failed_over="n2")), (("n3", "n4"), GroupRecord())]
    assert serving_nodes(two_groups) == {"n2": "n1"}
