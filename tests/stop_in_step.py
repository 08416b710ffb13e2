"""python -m tests.stop_in_step N SCRIPT ARGS...: `python SCRIPT ARGS...` whose run gets a SIGTERM at its Nth stop
check (one after each optimiser step, one after each epoch), before the check reads it: a signal landing in that
step, at the one moment a real signal cannot be aimed at from outside."""
import runpy
import signal
import sys

import engine.stopping


def main() -> None:
    at, script, *args = sys.argv[1:]
    calls = 0
    check = engine.stopping.StopRequest.__call__

    def stop(self: engine.stopping.StopRequest) -> bool:
        nonlocal calls
        calls += 1
        if calls == int(at):
            self._handle(signal.SIGTERM, None)  # what the handler StopRequest installs does with the signal
        return check(self)

    engine.stopping.StopRequest.__call__ = stop
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
