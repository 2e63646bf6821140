"""Put on PYTHONPATH by tests/run/test_ddp.py: makes rank 1 of the ranks that run.py starts (LOCAL_RANK=1 with
PDQ_PARENT_PID set) exit with code 3, as a crash of that process would end it:
* PDQ_TEST_RANK_EXIT=start: at once, before it joins the process group;
* PDQ_TEST_RANK_EXIT=<path>: as soon as that file exists (e.g. the run's first saved unit), in the middle of the run.
Any other process (rank 0, the test itself) is left alone."""

import os
import threading
import time

_WHEN = os.environ.get("PDQ_TEST_RANK_EXIT")
EXIT_CODE = 3

if _WHEN and os.environ.get("LOCAL_RANK") == "1" and "PDQ_PARENT_PID" in os.environ:
    if _WHEN == "start":
        os._exit(EXIT_CODE)

    def _exit_when_written(path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.05)
        os._exit(EXIT_CODE)

    threading.Thread(target=_exit_when_written, args=(_WHEN,), daemon=True).start()
