"""Console scripts. Each turns user errors into one line on stderr and a non-zero exit."""

import sys
import warnings
from typing import Callable

# megatron-core warns at import time that apex / Transformer Engine are missing; on CPU that is
# expected, and megatron_ratplus.optional reports a missing dependency when a feature needs it.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, module="(torch.distributed|megatron)")


def run_cli(prog: str, main: Callable[[], object], user_errors: tuple) -> int:
    """Call ``main``; a user error becomes ``prog: error: message`` and exit status 2."""
    try:
        main()
    except user_errors as err:
        print(f"{prog}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
