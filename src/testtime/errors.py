"""Exceptions with messages meant for users."""


class TestTimeError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(TestTimeError, ValueError):
    """Missing, malformed or incompatible data (files, arrays, batches)."""


class ConfigError(TestTimeError, ValueError):
    """Unknown name or invalid configuration value."""


class ModelError(TestTimeError, ValueError):
    """A model lacks what a method needs, or a weights file is wrong."""
