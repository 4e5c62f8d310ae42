"""Errors a model raises about its input, which the scripts report as one line."""


class InputSizeError(ValueError):
    """An input whose size the model cannot take; the message says which sizes it can."""
