"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""
