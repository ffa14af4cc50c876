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


class TrainingError(TextRNNError):
    """Training that cannot go on (diverged, too many non-finite steps)."""

    exit_code = 1
