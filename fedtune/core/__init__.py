"""The shared core: config, wire formats, adapters, privacy math, secure aggregation, models.

Imported by the hospital node, the coordinator and the strategies; imports none of them.
"""
