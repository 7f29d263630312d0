"""`python -m client_sim bench ...`: see client_sim/bench.py."""

from __future__ import annotations

import argparse
import sys

from client_sim import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client_sim")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(commands.add_parser("bench", help="failover with dual connections"))
    args = parser.parse_args(argv)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
