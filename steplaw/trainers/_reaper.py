"""The guard of one worker's command trainers (run as a script, `python -I -S`, once per
worker process): it kills every process group it was told about when its worker dies.

The worker starts each command in a process group of its own and writes "+PGID" to this
process's stdin before it waits on the command, and "-PGID" when the run is over. When
the worker dies, however it dies (a kill -9 of the driver takes the workers with it),
this process sees its stdin close, and Linux also sends it SIGTERM (PR_SET_PDEATHSIG):
either way it SIGKILLs every group still registered (the command's children too, e.g.
torchrun's) and exits. It imports nothing of steplaw, so that it starts in milliseconds,
and it is started once per worker, not once per run.
"""
import os
import signal
import sys

groups = set()


def kill_all(signum=None, frame=None):
    for pgid in list(groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


def main() -> None:
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, kill_all)
    if os.getppid() != parent:  # the worker died before we could ask
        kill_all()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+":
            groups.add(int(line[1:]))
        elif line[:1] == "-":
            groups.discard(int(line[1:]))
    kill_all()  # stdin closed: the worker is gone


if __name__ == "__main__":
    main()
