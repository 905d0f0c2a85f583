"""Errors the engine raises for bad input: each names the item and the fix."""


class AttributionInputError(ValueError):
    """Bad input to the engine (audio, caption, loss, model folder); the message names the item and the fix."""


class ModelSourceError(ValueError):
    """A model folder or checkpoint reference that cannot be loaded as a tda model."""


class UnlearningStrengthError(AttributionInputError):
    """The `newton` step-size search could not reach the target query-loss ratio within `lr_min`…`lr_max`."""
