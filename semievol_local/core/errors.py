"""The one exception type for mistakes a user can fix (bad file, bad flag, unknown model).

Library code raises `UserError` with a message that names the file, row or value and says what to do;
only the CLI prints it (one line, no traceback) and picks the exit code.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2
