"""The one error type users see for bad input: a message naming the bad value and what is accepted."""


class PdqError(ValueError):
    """Bad user input (config value, missing data folder, corrupt checkpoint)."""
