"""The one error type a user can cause: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A failure the user can fix (bad path, unknown name, foreign cache...).

    The message is one line that names the problem and the fix.
    """
