"""Errors saekit raises for bad input. Each message says what was wrong and what to do."""


class SaekitError(Exception):
    """Base class of every error saekit raises on purpose."""


class ConfigError(SaekitError, ValueError):
    """A flag or config field with a value saekit cannot use."""


class ModelLoadError(SaekitError):
    """The model could not be found or loaded."""


class HookNameError(SaekitError, KeyError):
    """A hook name that the model does not have, or a layer beyond the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CorpusError(SaekitError):
    """The corpus is empty, missing, or its data package is not installed."""


class CacheMismatchError(SaekitError):
    """An output folder holds a cache made with other settings."""


class CorruptCacheError(SaekitError):
    """A cache shard is missing, truncated or does not match the manifest."""


class NonFiniteActivationsError(CorruptCacheError):
    """Activations hold NaN or inf."""


class TrainingError(SaekitError):
    """Training cannot start or go on with these settings or this data."""


class SAEConfigError(ConfigError):
    """An SAE configuration (or a saved SAE's cfg.json) with values saekit cannot use."""


class SAEInputError(SaekitError, ValueError):
    """Activations given to an SAE have the wrong shape."""
