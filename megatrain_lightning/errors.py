"""The one error type for what a user got wrong (a config field, a file, an argument): `train.py` prints its
message on one line and exits 2; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input. The message starts with what is wrong: the config field (`data.micro_batch: ...`) or the file."""
