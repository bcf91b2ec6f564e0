"""``python tests/_kill_runner.py KILL_AT -- TRAIN ARGS``: ``python -m training.train`` that kills
itself with SIGKILL at a given point (a real, unclean process death, for the resume tests).

KILL_AT: ``finish:N`` (the N-th checkpoint of this process is written but not yet moved into
place), ``export`` (the last checkpoint is written, the adapter not yet exported), ``none``."""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    kill_at, argv = sys.argv[1], sys.argv[3:]
    from training import checkpoint as ck

    kind, _, arg = kill_at.partition(":")
    if kind == "finish":
        orig, calls = ck.finish, [0]

        def finish(*a, **k):
            calls[0] += 1
            if calls[0] == int(arg):
                die()
            return orig(*a, **k)

        ck.finish = finish
    elif kind == "export":
        ck.export_adapter = lambda *a, **k: die()
    from training.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
