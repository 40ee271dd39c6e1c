"""Aggregation math (pure numpy) and the registry of strategies chosen by name."""
