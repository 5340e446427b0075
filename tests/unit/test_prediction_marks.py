"""rollout.router.outcomes.marks with real processes: a mark survives its owner's SIGKILL and is counted exactly once; a
live owner's mark is never claimed; a clean close leaves nothing to count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rollout.router.outcomes.marks import SUFFIX, RunMark, claim_orphans

#: A process that takes a mark, accepts ``argv[2]`` rows, settles ``argv[3]`` of them, and is SIGKILLed.
KILLED = """
import os, signal, sys
from pathlib import Path
from rollout.router.outcomes.marks import RunMark
mark = RunMark.create(Path(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    mark.record()
mark.settle(int(sys.argv[3]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_owner(directory: Path, recorded: int, settled: int) -> int:
    child = subprocess.run([sys.executable, "-c", KILLED, str(directory), str(recorded), str(settled)], check=False)
    assert child.returncode == -signal.SIGKILL
    return child.returncode


def test_what_a_killed_owner_accepted_and_never_settled_is_counted_once(tmp_path: Path) -> None:
    killed_owner(tmp_path, recorded=1234, settled=1000)
    [orphan] = claim_orphans(tmp_path)
    assert (orphan.recorded, orphan.settled, orphan.lost) == (1234, 1000, 234)
    assert orphan.pid != os.getpid() and orphan.started_at > 0
    assert claim_orphans(tmp_path) == []  # removed when claimed: never counted twice
    assert list(tmp_path.iterdir()) == []


def test_a_live_owner_s_mark_is_not_claimed_and_a_clean_close_leaves_nothing(tmp_path: Path) -> None:
    mark = RunMark.create(tmp_path)
    for _ in range(5):
        mark.record()
    mark.settle(5)
    assert claim_orphans(tmp_path) == []  # locked by its owner (this process, another open file description)
    assert mark.path.exists() and mark.path.suffix == SUFFIX
    mark.close(remove=mark.recorded == mark.settled)
    assert list(tmp_path.iterdir()) == []


def test_two_marks_of_killed_owners_are_each_counted(tmp_path: Path) -> None:
    killed_owner(tmp_path, recorded=10, settled=10)  # killed while idle: nothing lost
    killed_owner(tmp_path, recorded=7, settled=2)
    assert sorted(o.lost for o in claim_orphans(tmp_path)) == [0, 5]
