"""The exceptions textrnn raises for problems a user can fix.

Library code raises these with a message that names the input and the problem; only
``textrnn/cli.py`` turns them into a one-line ``error: ...`` and an exit code.
"""


class TextRNNError(Exception):
    """Base class: a problem with the user's input, files or settings (exit code 2)."""

    exit_code = 2


class InputError(TextRNNError):
    """A corpus, prompt or path that cannot be used as given."""


class ConfigError(TextRNNError):
    """A setting that is out of range, of the wrong type, or unknown."""


class CheckpointError(TextRNNError):
    """A run directory that is missing, damaged, or not a textrnn run."""


class DatasetError(TextRNNError):
    """A named dataset that is unknown, unreachable, or fails its checksum."""


class StorageError(TextRNNError):
    """A write that failed for a reason other than the user's choice of path (disk full, I/O error)."""

    exit_code = 1


def write_error(path: object, exc: OSError, what: str = "cannot write") -> TextRNNError:
    """The error for a failed write: the user's path (exit 2) or the storage under it (exit 1)."""
    import errno

    message = f"{path}: {what} ({exc.strerror or exc})"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                     errno.EEXIST, errno.ENAMETOOLONG):
        return InputError(message)
    return StorageError(message)


class TrainingError(TextRNNError):
    """Training that cannot go on (diverged, too many non-finite steps)."""

    exit_code = 1
