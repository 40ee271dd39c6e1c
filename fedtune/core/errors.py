"""The error every layer raises for a wrong setting: its message names the file, the key and
the fix, because a hospital admin reads it, not a developer."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and how to fix it."""


class SharedInitMismatch(ValueError):
    """The coordinator's LoRA A matrices are not the shared initial ones (FFA-LoRA).

    Here, not beside the check (which needs torch), so that the ClientApp can name every
    refusal without importing the training stack.
    """
