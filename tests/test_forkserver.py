"""The fork server runs a script as a fresh `python script.py` would: the same exit status, output,
argv, working directory and environment, exit handlers and threads, and the same timeout behaviour."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import forkserver
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = """\
import atexit, os, signal, sys, threading, time
atexit.register(lambda: print("exit handler ran", flush=True))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("FORKSERVER_PROBE"), "path0", sys.path[0])
mode = sys.argv[1]
if mode == "message":
    sys.exit("a message for stderr")
if mode == "status":
    sys.exit(3)
if mode == "raise":
    raise ValueError("an uncaught error")
if mode == "interrupt":
    raise KeyboardInterrupt
if mode == "signal":
    signal.raise_signal(signal.SIGTERM)
if mode == "thread":
    threading.Thread(target=lambda: (time.sleep(1), print("thread finished", flush=True))).start()
if mode == "pool":  # a pool kept alive to the end, as torch.compile's: the interpreter stops its threads at exit
    from concurrent.futures import ThreadPoolExecutor
    sys.pool = ThreadPoolExecutor(2)
    sys.pool.submit(print, "pool task ran", flush=True).result()
if mode == "sleep":
    print("sleeping", os.getpid(), flush=True)
    time.sleep(60)
if mode == "barrier":  # four runs served one after another would never all be here at once
    open(f"started.{os.getpid()}", "w").close()
    deadline = time.time() + 30
    while sum(name.startswith("started.") for name in os.listdir()) < 4:
        if time.time() > deadline:
            sys.exit("the other runs did not start beside this one")
        time.sleep(0.01)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(SCRIPT)
    forkserver.run([str(path), "ok"], path.parent, dict(os.environ), timeout=120)  # the server is up before a test
    return path                                                                   # times a run


def _cold(args, cwd, env, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["ok", "message", "status", "raise", "interrupt", "signal", "thread", "pool"])
def test_a_forked_run_ends_with_the_status_output_and_exit_handlers_of_a_fresh_process(script, tmp_path, mode):
    env = {**os.environ, "FORKSERVER_PROBE": f"value-{mode}"}
    warm = forkserver.run([str(script), mode], tmp_path, env, timeout=60)
    cold = _cold([str(script), mode], tmp_path, env)
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    assert warm.stdout.startswith(f"argv ['{mode}'] cwd {tmp_path} env value-{mode} path0 {script.parent}")
    # A traceback names the server's frames above the script's: compare the last line, the error itself.
    assert warm.stderr.splitlines()[-1:] == cold.stderr.splitlines()[-1:]


def test_a_module_run_takes_the_working_directory_as_its_path(tmp_path):
    env = {**os.environ, "LT_PRETRAINED_CACHE": str(tmp_path)}  # not the user's cache, which another test may fill
    warm = forkserver.run(["-m", "models", "list"], REPO, env, timeout=60)
    cold = _cold(["-m", "models", "list"], REPO, env)
    assert warm.returncode == cold.returncode == 0 and warm.stdout == cold.stdout


def test_a_run_past_its_timeout_is_killed_and_raises_as_subprocess_run_does(script, tmp_path):
    start = time.time()
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        forkserver.run([str(script), "sleep"], tmp_path, dict(os.environ), timeout=2)
    assert time.time() - start < 10 and "sleeping" in timed_out.value.output
    # The killed run is gone (its handler reaps it): its pid leaves /proc.
    run = Path("/proc", timed_out.value.output.split()[-1])
    deadline = time.time() + 30
    while run.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert not run.exists()


def test_runs_requested_at_once_run_side_by_side(script, tmp_path):
    results = {}

    def one(k):
        results[k] = forkserver.run([str(script), "barrier"], tmp_path, dict(os.environ), timeout=60)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results.values()] == [0] * 4, [r.stderr for r in results.values()]


def test_other_interpreter_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not -c"):
        forkserver.run(["-c", "pass"], tmp_path, dict(os.environ), timeout=10)
