"""Operations: the command line, launchers, deployment, federation keys and the demo.

The top layer: it may import every layer below it, and nothing below imports it.
"""
