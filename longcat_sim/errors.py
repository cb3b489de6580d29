"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""


def os_error_line(exc: OSError) -> str:
    """One line for an error the operating system reported (a full disk, a missing folder, a
    refused socket), naming the file when there is one."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    if exc.filename:
        return (
            f"cannot read or write {str(exc.filename)!r}: {reason}; check the path and free space"
        )
    return f"the system refused an operation: {reason}"
