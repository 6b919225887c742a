"""The one exception type the build reports to the user (exit status 2, no traceback)."""

from collections.abc import Sequence


class BuildError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""


def listing(items: Sequence[str], shown: int = 1) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more: a message names a
    few, not hundreds."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")
