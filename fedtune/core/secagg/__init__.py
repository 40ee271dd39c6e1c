"""Secure aggregation: pure protocol code (no Flower imports)."""
