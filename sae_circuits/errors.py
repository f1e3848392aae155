"""Errors that describe bad user input; the CLI turns them into one line on stderr and exit status 2."""


class UserInputError(ValueError):
    """Input the user can fix: an unknown site, a missing file, a dictionary that does not fit the model."""
