"""Console scripts. Each parses with megatron_ratplus.errors.ArgumentParser and runs under
:func:`run_cli`, which turns a UserError into one line on stderr and exit status 2."""

import sys
from typing import Callable

from megatron_ratplus.errors import UserError


def run_cli(prog: str, main: Callable[[], object]) -> int:
    """Call ``main``; a UserError becomes ``prog: error: message`` and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"{prog}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
