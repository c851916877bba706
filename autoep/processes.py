"""Whether a process of this host is running, for the files and folders named after their writer's pid
(checkpoint temporaries, the launcher's store folders): those of dead writers are removed by the next run."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    if not 0 < pid < (1 << 22):  # beyond Linux's PID_MAX_LIMIT: no process has it (os.kill would overflow)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
