"""`python -m model.train`, held for good at one point of one save (tests/model/test_kills.py
SIGKILLs the job there): the test-side wrapper of the Checkpointer, so production code has no hook.

    torchrun ... -m tests.model.held_train CONFIG      with HOLD_SAVE_ENV="STEP:POINT:FOLDER"

Each rank's save of STEP creates FOLDER/POINT-rankR and blocks, POINT being "start" (nothing of
the save written yet) or "commit" (this rank's files on the store, COMMIT not yet written).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

from model import train
from model.checkpoint import Checkpointer

HOLD_SAVE_ENV = "TINYLLAMA_TEST_HOLD_SAVE"
HELD_METHOD = {"start": "save", "commit": "_commit"}  # the Checkpointer method a point comes before


def hold(step: int, point: str, folder: Path) -> None:
    """Make every Checkpointer of this process block before `point` of its save of `step`."""
    method = getattr(Checkpointer, HELD_METHOD[point])

    @functools.wraps(method)
    def held(self: Checkpointer, at_step: int, *args, **kwargs):
        if at_step == step:
            (folder / f"{point}-rank{self.rank}").touch()
            threading.Event().wait()
        return method(self, at_step, *args, **kwargs)

    setattr(Checkpointer, HELD_METHOD[point], held)


if __name__ == "__main__":
    held_step, held_point, held_folder = os.environ[HOLD_SAVE_ENV].split(":", 2)
    hold(int(held_step), held_point, Path(held_folder))
    sys.exit(train.main())
