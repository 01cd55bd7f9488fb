"""Ops: what the ops team reads and does (issue 5)."""
