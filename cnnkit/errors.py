"""The one exception type the library raises for problems a person can fix."""


class CnnkitError(Exception):
    """A bad input, flag or environment, with a message that says what to do.

    The CLI prints the message on one line and exits with code 2; library
    users catch it like any other exception.
    """
