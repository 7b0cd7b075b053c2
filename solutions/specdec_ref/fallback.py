"""Week 4 Day 3 — fallback: speculation that never loses (being written)."""
