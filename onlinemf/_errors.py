"""Error types. Anything a user can cause raises :class:`InputError` with a one-line message
naming the input, what was expected and what was found; the CLI prints it and exits non-zero."""


class InputError(ValueError):
    """A problem with the user's input (files, options, data). The message is shown as is."""


class ModelError(InputError):
    """A model file that cannot be used (wrong version, inconsistent shapes, not a model)."""
