"""Test hook, imported by Python at start-up when this folder is on PYTHONPATH: at one named file
operation of a synthgen process, SIGKILL it or hold it until a file exists; or log every file
renamed into place.

CPython's audit hooks (PEP 578, `sys.addaudithook`) see the operation, just before the system
call: nothing of synthgen is patched, and the real code runs up to the instant of the kill.

  SYNTHGEN_TEST_AT   EVENT:PATH, EVENT one of
                       open    the temporary of PATH is opened for writing (still empty)
                       rename  PATH's complete temporary is about to be renamed into place
                       remove  PATH is about to be deleted
                     PATH relative to OUT, matched as the end of the path
  SYNTHGEN_TEST_DO   kill (the default) | wait:FILE (this thread sleeps until FILE exists;
                     the process's other threads, such as its lease renewal, go on)
  SYNTHGEN_TEST_LOG  FILE: append the target of every rename, one per line
"""

import os
import re
import signal
import sys
import time

_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")  # synthgen.output.outdir's rule


def _target(event: str, args: tuple) -> tuple[str, str] | None:
    if event == "os.rename":
        return "rename", str(args[1])
    if event == "os.remove":
        return "remove", str(args[0])
    if event == "open" and isinstance(args[1], str) and "w" in args[1]:
        path = str(args[0])
        if _TEMPORARY.search(path):
            return "open", _TEMPORARY.sub("", path)
    return None


def _install() -> None:
    at = os.environ.get("SYNTHGEN_TEST_AT")
    log = os.environ.get("SYNTHGEN_TEST_LOG")
    if not at and not log:
        return
    wanted_event, _, wanted_path = (at or "").partition(":")
    action = os.environ.get("SYNTHGEN_TEST_DO", "kill")
    fired = []

    def hook(event: str, args: tuple) -> None:
        found = _target(event, args)
        if found is None:
            return
        kind, path = found
        if log and kind == "rename":
            with open(log, "a") as handle:  # an "open" event too, but not of a temporary
                handle.write(path + "\n")
        if at and not fired and kind == wanted_event and path.endswith("/" + wanted_path):
            fired.append(True)
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            release = action.removeprefix("wait:")
            while not os.path.exists(release):
                time.sleep(0.05)

    sys.addaudithook(hook)


_install()
