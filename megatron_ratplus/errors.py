"""The one base class of user errors.

Every mistake a user can make (a bad flag, path, pattern, checkpoint or data file) raises a
subclass of :class:`UserError` whose message is one line; the command-line entry points catch
only this class and turn it into ``PROG: error: MESSAGE`` and exit status 2. Anything else is
a bug and keeps its traceback.

:class:`ArgumentParser` is the argparse parser of every command-line tool: a bad flag becomes
a UserError instead of argparse's usage text and exit status 2 from inside the parser.
"""

import argparse


class UserError(ValueError):
    """A problem with the user's input; ``str(err)`` is one line meant for the user."""


def first_line(err: BaseException) -> str:
    """The first line of a library's exception, for a one-line message about it; its class name
    when it has no text (torch.load of an empty file raises a bare ``EOFError()``)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as UserError (``--help`` still prints and exits 0)."""

    def error(self, message):
        raise UserError(message)
