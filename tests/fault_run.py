"""`gptstack` with a kill -9 injected at one file write, for tests/test_faults.py.

Every file gptstack writes goes through common.atomic_write_bytes: a temporary file, fsynced, then
os.replace over the target. This wrapper counts the os.replace calls whose target path contains
FAULT_MATCH and SIGKILLs its own process at call number FAULT_AT: before the rename (FAULT_WHEN=
before: the new file is complete on disk but not in place — a kill inside the checkpoint write) or
just after it (after). FAULT_AT=0 kills nowhere; with FAULT_LOG=FILE every replaced path is
written to FILE (JSON) at exit, to draw kill points from.

    FAULT_MATCH=run/sft/ FAULT_AT=3 FAULT_WHEN=after python tests/fault_run.py run --recipe micro ...
"""
import atexit
import json
import os
import signal
import sys

match, at, when = os.environ.get("FAULT_MATCH", ""), int(os.environ.get("FAULT_AT", "0")), os.environ.get("FAULT_WHEN", "after")
calls, log = 0, []
_replace = os.replace


def _kill() -> None:
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def replace(src, dst, *args, **kwargs):
    global calls
    log.append(os.fspath(dst))
    if match and match in os.fspath(dst):
        calls += 1
        if calls == at and when == "before":
            _kill()
        _replace(src, dst, *args, **kwargs)
        if calls == at:
            _kill()
        return None
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
if os.environ.get("FAULT_LOG"):
    atexit.register(lambda: open(os.environ["FAULT_LOG"], "w").write(json.dumps(log)))

from gptstack.cli import main  # noqa: E402  (after the patch, so every write goes through it)

sys.exit(main(sys.argv[1:]))
