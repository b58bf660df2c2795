"""Decisions, not data path: registry, KV index, router, SLO classes, cost accounting. No torch."""
