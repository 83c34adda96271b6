"""The one exception type the tool raises for bad input or a failed step.

Its message is a single line that names the file and, where there is one, the tensor; the
command line prints it and exits non-zero.
"""


class ConvertError(Exception):
    """A user-facing error: bad input, an impossible request, or a failed write."""

    def __init__(self, message: str):
        # One line, always: multi-line text would break the command line's contract.
        super().__init__(" ".join(str(message).split()))
