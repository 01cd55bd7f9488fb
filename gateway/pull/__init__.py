"""Pulls: partners whose data the gateway fetches instead of receiving (SPEC §1).

One module per pulled source.  Each keeps its cursor in ``pull_state`` and advances it in the
same transaction as the records a page produced, so a crash loses nothing and duplicates
nothing.  The scheduler (``gateway.scheduling``) runs them once cluster-wide.
"""

from __future__ import annotations

from gateway.pull.cadre_college import PullResult, PullState, pull_once, read_state

__all__ = ["PullResult", "PullState", "pull_once", "read_state"]
