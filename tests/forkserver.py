"""Runs the tests' script commands in processes forked from one that has already imported torch.

Most of the suite's CPU time went to starting Python: every `python stage1_train.py ...` of a test
imported torch (about 2 s here) and torch._dynamo (about 1.5 s, which torch.optim imports when the
first optimiser is built), and tore its modules down at exit (about 1 s), around a few seconds of
work. Here a server per test process imports them and the entry scripts' packages once; each run is
a child forked from it that executes the command as `python script.py args` (or `python -m module
args`) would: its own process, argv, sys.path[0], working directory, environment, stdin (/dev/null),
stdout and stderr, exit status (a signal's as its negative number), signal handling, non-daemon
threads joined and atexit handlers run at exit. What differs: the imports are done, a traceback has
the server's frames above the script's, and the runs of one server share its hash seed.

The server forks a handler per request, so that it stays one thread (forking a process that has
threads is unsafe) and serves requests side by side; the handler forks the run, reports its pid,
waits for it and reports its exit status. Runs that must start cold start as before, through
subprocess: the GPU tests, torchrun's workers, runs that a test signals or kills through a Popen, the
runs whose weights two processes must reproduce bit for bit (tests/faults/kill_resume.py) and runs
under resource limits. LT_TESTS_COLD=1 starts every run cold.

    python -m tests.forkserver SOCKET   # serves until its parent process (the test process) exits
"""
from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Imported by the server before it forks: torch and what the scripts import lazily, then the entry
# scripts themselves (importing one runs nothing: their main() runs only as __main__).
PRELOAD = ("torch", "torch._dynamo", "torchvision.transforms.v2", "torch.utils.tensorboard", "higher",
           "stage1_train", "stage2_classifier", "predict")


def _std_stream(fd: int, mode: str) -> io.TextIOWrapper:
    """A new sys.std* over file descriptor fd, unbuffered as under PYTHONUNBUFFERED (a killed run loses nothing)."""
    raw = io.FileIO(fd, mode, closefd=False)
    if mode == "r":
        return io.TextIOWrapper(io.BufferedReader(raw), errors="strict")
    return io.TextIOWrapper(raw, errors="backslashreplace" if fd == 2 else "strict", write_through=True)


def _exit_status(code: object) -> int:
    """The exit status of `raise SystemExit(code)`, as the interpreter gives it (a message: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run(request: dict) -> None:
    """In the forked run: take the request's cwd, environment and files, execute its command, and exit as
    the interpreter would (non-daemon threads joined, atexit handlers run, output flushed), except that
    the modules are not torn down one by one: with torch loaded that takes about a second, and nothing
    is observable of it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["err"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = sys.__stdin__ = _std_stream(0, "r")
    sys.stdout = sys.__stdout__ = _std_stream(1, "w")
    sys.stderr = sys.__stderr__ = _std_stream(2, "w")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args, interrupted = request["args"], False
    try:
        if args[0] == "-m":  # python -m module args: sys.path[0] is the working directory
            sys.path[0] = os.getcwd()
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:  # python script.py args: sys.path[0] is the script's folder
            script = os.path.abspath(args[0])
            sys.path[0] = os.path.dirname(script)
            sys.argv = list(args)
            runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException as error:  # the interpreter prints it and exits 1; an uncaught Ctrl-C ends by SIGINT
        sys.excepthook(type(error), error, error.__traceback__)
        status, interrupted = 1, isinstance(error, KeyboardInterrupt)
    # The interpreter's own exit sequence: threading's exit hooks (concurrent.futures tells its pools'
    # threads to stop, as torch.compile's pool must be), non-daemon threads joined, then atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _handle(conn: socket.socket) -> None:
    """In a handler process: read the request, fork the run, report its pid, wait for it and report its
    exit status (a signal's as its negative number, as subprocess does)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the handler waits for its run
    with conn.makefile("r") as lines:
        request = json.loads(lines.readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request)
    try:
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the client is gone (it timed out and killed the run)
        pass
    os._exit(0)


def serve(path: str) -> None:
    """Preload, then fork a handler per connection until the parent process is gone."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # left to the runs that import it, whose stderr then shows why, as a fresh process's would
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the handlers
    parent = os.getppid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(64)
        server.settimeout(1.0)
        print("ready", flush=True)
        while os.getppid() == parent:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            if os.fork() == 0:
                try:
                    server.close()
                    _handle(conn)
                finally:  # a handler never returns to the loop
                    os._exit(1)
            conn.close()


class ForkServer:
    """The client: start the server once, then run commands through it, each like subprocess.run
    with capture_output=True, text=True."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="forkserver-")
        self.path = os.path.join(self._dir.name, "socket")
        self._server = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.path], cwd=REPO,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        ready = self._server.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the fork server did not start (it printed {ready!r})")
        atexit.register(self.close)

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        if args[0].startswith("-") and args[0] != "-m":
            raise ValueError(f"the fork server runs `script.py ...` and `-m module ...`, not {args[0]}")
        cmd = [sys.executable, *args]
        with tempfile.TemporaryDirectory(prefix="run-", dir=self._dir.name) as files:
            out, err = Path(files, "stdout"), Path(files, "stderr")
            out.touch()
            err.touch()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.path)
                request = {"args": list(args), "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
                conn.sendall((json.dumps(request) + "\n").encode())
                with conn.makefile("r") as replies:
                    pid = replies.readline()
                    if not pid:
                        raise RuntimeError(f"the fork server ended (exit status {self._server.poll()})")
                    conn.settimeout(timeout)
                    try:
                        code = int(replies.readline())
                    except TimeoutError:  # as subprocess.run: kill the run, then raise
                        os.kill(int(pid), signal.SIGKILL)
                        raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.terminate()
            self._server.wait()
        self._dir.cleanup()


_server: ForkServer | None = None
_lock = threading.Lock()


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python *args` from cwd with env, through this test process's fork server (started on first use)."""
    global _server
    with _lock:
        if _server is None:
            _server = ForkServer()
    return _server.run(args, cwd, env, timeout)


if __name__ == "__main__":
    serve(sys.argv[1])
