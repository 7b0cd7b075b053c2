"""Week 4 Day 2 — metrics: per round, per request, across requests (being written)."""
