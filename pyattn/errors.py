"""The exceptions pyattn raises on bad input.

torch raises RuntimeError for bad attention inputs, so code written for torch catches RuntimeError; pyattn's
errors are RuntimeErrors too, and also the ValueError or TypeError that Python code expects.
"""


class AttentionInputError(RuntimeError, ValueError):
    """An argument's value, shape or device is wrong (the message names it and the shapes)."""


class AttentionTypeError(AttentionInputError, TypeError):
    """An argument's type or dtype is wrong."""
