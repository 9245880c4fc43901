"""The one exception type for mistakes a user can fix (bad file, bad flag, unknown model).

Library code raises `UserError` with a message that names the file, row or value and says what to do;
only the CLI prints it (one line, no traceback) and picks the exit code.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2


class CannotHelp(UserError):
    """The method cannot help with this model and data as they are (the warm-up collapsed onto one answer):
    one line saying what was seen and what to try, and its own exit code, 3, so a script can tell it apart."""

    exit_code = 3
