"""Errors a user can fix. The CLI prints them as one line on stderr and exits with their ``exit_code``:
2 for bad input (found before anything is written), 1 for a run that produced nothing."""


class KdsearchError(Exception):
    """Base class: bad input, missing files, unreachable services — never a bug in kdsearch."""

    exit_code = 2


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


class NoTrialCompleted(KdsearchError):
    """A study command ran trials and none of them completed (each failed, or was pruned). Not bad input:
    the inputs were accepted and the study kept, so the exit code is 1, not 2."""

    exit_code = 1
