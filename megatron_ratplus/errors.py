"""The one base class of user errors.

Every mistake a user can make (a bad flag, path, pattern, checkpoint or data file) raises a
subclass of :class:`UserError` whose message is one line; the command-line entry points catch
only this class and turn it into ``PROG: error: MESSAGE`` and exit status 2. Anything else is
a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input; ``str(err)`` is one line meant for the user."""
