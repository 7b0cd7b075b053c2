"""Week 4 Day 1 — contracts: checkable promises of the core functions (being written)."""
