"""The one exception type the build reports to the user (exit status 2, no traceback)."""


class BuildError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""
