"""The one exception type for problems in what the user gave us."""


class EmfmError(Exception):
    """Bad input or config: the CLI prints it as one line, without a traceback."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        # torch re-raises a DataLoader worker's error as EmfmError("Caught EmfmError in DataLoader worker process 0.
        # Original Traceback ... emfm.errors.EmfmError: <the line>"): keep the line.
        if text.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            text = text.strip().splitlines()[-1].partition(": ")[2]
        super().__init__(text)


def first_line(text: object) -> str:
    """The first line of an error (a library's message may span many), for a one-line EmfmError."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(text).__name__
