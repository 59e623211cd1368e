"""Test-only (tests/test_faults_cli.py puts this folder on PYTHONPATH of the process it signals):
every checkpoint write after the first SKIP ones pauses SECONDS once its files are written, so a
signal sent when the save's temporary directory appears lands inside the save, not in a race.

RATPLUS_TEST_SLOW_WRITE="SKIP:SECONDS". Nothing here is imported by the product.
"""

import os

_SKIP, _SECONDS = (float(x) for x in os.environ.get("RATPLUS_TEST_SLOW_WRITE", "0:0").split(":"))

if _SECONDS:
    import time

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    _write_data, _calls = FileSystemWriter.write_data, [0]

    def write_data(self, plan, planner):
        result = _write_data(self, plan, planner)
        _calls[0] += 1
        if _calls[0] > _SKIP:
            with open(os.path.join(str(self.path), "slow-write-paused"), "w"):
                pass  # the test signals once this appears: the files are written, the save not finished
            time.sleep(_SECONDS)
        return result

    FileSystemWriter.write_data = write_data
