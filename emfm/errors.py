"""The one exception type for problems in what the user gave us."""


class EmfmError(Exception):
    """Bad input or config: the CLI prints it as one line, without a traceback."""
