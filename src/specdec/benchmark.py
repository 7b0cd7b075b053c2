"""Week 4 Day 5 — benchmarking: a sweep you can defend, measured against the theory (being written)."""
