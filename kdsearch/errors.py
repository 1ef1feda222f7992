"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class KdsearchError(Exception):
    """Base class: bad input, missing files, unreachable services — never a bug in kdsearch."""


class ConfigError(KdsearchError, ValueError):
    """A configuration value is out of range or unknown; the message names the field and the value."""


class DataError(KdsearchError):
    """A dataset cannot be found or read."""


class CheckpointError(KdsearchError):
    """A checkpoint cannot be read or does not fit the architecture."""


class StudyError(KdsearchError):
    """A study cannot be created, found or joined (storage unreachable, name taken, no such study)."""


class TrainingDiverged(KdsearchError):
    """The training loss became NaN or infinite (e.g. an extreme temperature or learning rate)."""


class NotWritable(KdsearchError):
    """A folder kdsearch must write to is read-only, or a file stands where a folder should be."""
