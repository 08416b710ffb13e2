"""python -m tests.stop_in_step N[:SIGNAL,...] SCRIPT ARGS...: `python SCRIPT ARGS...` whose run is signalled at its
Nth stop check (one after each optimiser step, one after each epoch), before the check reads it: a signal landing in
that step, at the one moment a real signal cannot be aimed at from outside.

N alone hands the check a SIGTERM (what the handler StopRequest installs does with one); N:SIGINT,SIGINT sends the
process those real signals there, one after the other, each handled before the next is sent (Python runs a signal's
handler at once when a process signals itself)."""
import os
import runpy
import signal
import sys

import engine.stopping


def main() -> None:
    at, script, *args = sys.argv[1:]
    at, _, sent = at.partition(":")
    calls = 0
    check = engine.stopping.StopRequest.__call__

    def stop(self: engine.stopping.StopRequest) -> bool:
        nonlocal calls
        calls += 1
        if calls == int(at):
            if not sent:
                self._handle(signal.SIGTERM, None)
            for name in filter(None, sent.split(",")):
                os.kill(os.getpid(), signal.Signals[name])
        return check(self)

    engine.stopping.StopRequest.__call__ = stop
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
