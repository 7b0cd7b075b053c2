"""Week 4 Day 1 — configuration: one validated SpeculativeConfig (being written)."""
