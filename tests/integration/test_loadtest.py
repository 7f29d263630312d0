"""`xmpp-ha loadtest` end to end: a pair, 50 Locust users with dual connections, n1
killed, restarted and fallen back to; the summary, CSV and report it writes.

Timing targets are benchmarks (docs/benchmarks.md); here every user must switch
both ways and no message may be lost."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

USERS = 50


@pytest.mark.parametrize("scenario", ["kill", "manual"])
def test_a_small_load_test_fails_over_and_back_without_losing_a_message(
    tmp_path: Path, scenario: str
) -> None:
    out = tmp_path / "lt"
    done = subprocess.run(
        [sys.executable, "-m", "xmpp_ha.cli", "loadtest", "--users", str(USERS), "--scenario",
         scenario, "--out", str(out), "--steady", "2", "--settle", "3", "--chat-interval", "1", "2",
         "--standby-delay", "0.2", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + _log(out / "locust.log")
    summary = json.loads((out / "summary.json").read_text())
    moved = summary["users_of_n1"]
    assert 0 < moved < USERS
    assert summary["downtime_s"]["n"] == moved  # one downtime per user of n1, each way
    assert summary["fallback_downtime_s"]["n"] == moved
    messages = summary["messages"]
    assert messages["sent"] > USERS
    assert messages["lost"] == 0
    assert messages["received"] == messages["sent"]
    assert summary["round_trip_s"]["n"] > 0
    with (out / "downtimes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["kind"] for row in rows} == {"failover", "fallback"}
    assert {row["user"] for row in rows if row["kind"] == "failover"} == {
        row["user"] for row in rows if row["kind"] == "fallback"
    }
    report = (out / "report.html").read_text()
    assert "<svg" in report and f"{scenario}, {USERS} users" in report
    stats = (out / "locust_stats.csv").read_text()  # Locust's own, with our request kinds
    assert "failover downtime" in stats and "message round trip" in stats


def test_loadtest_refuses_a_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "xmpp_ha.cli", "loadtest", "--users", "10", "--scenario", "kill",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not empty" in done.stderr
    assert (tmp_path / "something").read_text() == "keep me"


def _log(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""
