"""Week 4 Day 4 — serving: continuous batching behind an HTTP endpoint (being written)."""
