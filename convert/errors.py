"""The exceptions mm-convert raises, one small hierarchy callers can branch on.

Every message is a single line that names the file and, where there is one, the tensor; the command
line prints it and exits 1 (2 for `RequestError` raised while checking arguments is still 1: a usage
error is click's, before any of these).

    MMConvertError            anything mm-convert refuses or fails at
    ├── SourceError           the source checkpoint is malformed, inconsistent or unsupported
    ├── RequestError          an impossible request: parallel shape, profile, format, recipe, size
    ├── OutputError           the output folder: held by another run, someone else's files, no space
    ├── CheckFailed           a converted checkpoint failed (or could not be read for) a check
    └── HubError              the Hugging Face Hub: not found, refused, offline, a bad download
"""


class MMConvertError(Exception):
    """Base class: a user-facing error with a one-line message."""

    def __init__(self, message: str):
        # One line, always: multi-line text would break the command line's contract.
        super().__init__(" ".join(str(message).split()))


class SourceError(MMConvertError):
    """The source checkpoint cannot be converted as it is (bad header, missing tensor, NaN, ...)."""


class RequestError(MMConvertError):
    """What was asked cannot be done (tp/ep that SGLang would refuse, an unknown profile, a bad recipe)."""


class OutputError(MMConvertError):
    """The output folder cannot be written as asked (locked, foreign files, full disk, a changed source)."""


class CheckFailed(MMConvertError):
    """A converted checkpoint is not what it claims to be, or cannot be read as one."""


class HubError(MMConvertError):
    """A Hub operation failed: not found, no access, offline with files missing, a corrupt download."""
