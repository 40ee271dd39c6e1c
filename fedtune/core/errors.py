"""The error every layer raises for a wrong setting: its message names the file, the key and
the fix, because a hospital admin reads it, not a developer."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and how to fix it."""
