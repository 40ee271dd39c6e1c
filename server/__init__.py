"""Coordinator: the Flower ServerApp, round loop, checkpoints, metrics and export."""
