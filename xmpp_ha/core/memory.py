"""Garbage-collector settings for processes that hold many long-lived objects.

A node with thousands of sessions (and the client simulator with thousands of
connections) keeps millions of container objects alive. CPython's cyclic
collector walks all of them on every full (generation 2) collection: about
0.2 s each with 5,000 sessions, several times during a failover, with the
event loop stopped. Nearly all of our garbage is freed by reference counting;
cycles are rare. So: objects alive once the process is set up are frozen (never
walked again), and collections run far less often.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
GEN1_THRESHOLD = 20  # young collections per middle one (default 10)
GEN2_THRESHOLD = 100  # middle collections per full one (default 10)


def tune_garbage_collector() -> None:
    """Call once the process is set up (modules imported, listeners started)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
