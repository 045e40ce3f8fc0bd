"""User-facing errors: each says what is wrong and how to fix it."""


class LowbitError(Exception):
    """Base class for errors caused by user input or environment, shown without a traceback."""


class ConfigError(LowbitError, ValueError):
    """An invalid setting (bits, group size, ...)."""


class CheckpointError(LowbitError):
    """A checkpoint that is missing, corrupt or inconsistent."""


class OutputError(LowbitError):
    """An output place that cannot be written: no permission, a read-only disk, too little free space."""


class DataError(LowbitError):
    """A text source that is missing or unusable."""


class PullError(LowbitError):
    """A zoo pull that failed."""


class UnsupportedModelError(LowbitError):
    """A model architecture lowbit has no adapter for."""


class ExportError(LowbitError, ValueError):
    """A checkpoint that a target format cannot hold exactly, or an export setting that does not apply."""
