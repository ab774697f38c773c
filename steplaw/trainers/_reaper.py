"""The process between a worker and a command trainer (run as a script, `python -I -S`):
it starts the command (`/bin/sh -c CMD`) as the leader of a new process group and makes
sure that no process of that group outlives the run.

Linux sends it SIGTERM when its parent (the sweep's worker) dies, however it dies, a
kill -9 of the driver included (PR_SET_PDEATHSIG); SIGTERM, SIGINT and the end of the
command all kill the whole group (the command's children too, e.g. torchrun's). It
imports nothing of steplaw, so that it starts in milliseconds.

    python -I -S _reaper.py PARENT_PID CMD
"""
import os
import signal
import sys


def main() -> int:
    parent, command = int(sys.argv[1]), sys.argv[2]
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before we could ask
        return 137
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.execv("/bin/sh", ["sh", "-c", command])
    try:
        os.setpgid(child, child)  # both sides, so that the group exists before any kill
    except OSError:
        pass

    def kill_group(signum=None, frame=None):
        try:
            os.killpg(child, signal.SIGKILL)
        except OSError:
            pass
        if signum is not None:
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, kill_group)
    _, status = os.waitpid(child, 0)
    kill_group()  # what the command left running in its group
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
