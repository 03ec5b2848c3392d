"""User-facing errors: one line that names the file and the problem, printed by the CLI without a traceback."""


class DCAEError(Exception):
    """An error caused by the user's input (a file, a value, a checkpoint), not by a bug in dcae."""
