"""The one exception type whose message is shown to the user as is."""


class AnybitError(Exception):
    """A problem the user can act on (bad path, bad option, corrupt file); the CLI prints it in one line."""
