"""One rank of the rank-death tests (tests/comm/test_watchdog.py): no GPU, the real rendezvous and watchdog.

``python tests/helpers/watchdog_worker.py DIR MODE``: bootstraps (rank 0's payload ``b"uid"``), writes
``DIR/ready-RANK`` (holding its pid), then by MODE:

- ``hang``: every rank waits "in a collective" (sleeps; SIGTERM ignored, as a rank blocked on a GPU that the
  launcher's SIGTERM may not reach in time) until the watchdog ends it;
- ``raise``: rank 1 raises RuntimeError("boom in rank 1") once every rank is ready, the others hang;
- ``clean``: rank 1 ends at once, the others after 1 s, all normally (exit 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from fi_ffi.comm.env import read_env
from fi_ffi.comm.watchdog import bootstrap


def main() -> None:
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    env = read_env()
    payload, dog = bootstrap(env, b"uid" if env.rank == 0 else None, timeout=60)
    assert payload == b"uid" and dog is not None
    # written whole, then renamed: rank 1 raises once every ready file exists, and a rank the watchdog then ends
    # between creating its file and writing its pid would leave it empty for the test to wait on
    partial = folder / f".pid-{env.rank}"
    partial.write_text(str(os.getpid()))
    os.replace(partial, folder / f"ready-{env.rank}")
    if mode == "clean":
        time.sleep(0 if env.rank == 1 else 1.0)
        return  # atexit says goodbye
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "raise" and env.rank == 1:
        while len(list(folder.glob("ready-*"))) < env.world_size:
            time.sleep(0.05)
        raise RuntimeError("boom in rank 1")
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    main()
