"""The one exception type for problems in what the user gave us."""


class EmfmError(Exception):
    """Bad input or config: the CLI prints it as one line, without a traceback."""


def first_line(text: object) -> str:
    """The first line of an error (a library's message may span many), for a one-line EmfmError."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(text).__name__
