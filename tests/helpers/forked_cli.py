"""`fct ARGS` in a forked copy of the test process instead of a fresh interpreter.

A fresh `python -m fct` spends about 4 CPU seconds importing torch and timm before it does
anything; the end-to-end tests start some fifty of them, which on a 2-core machine was a
quarter of the whole suite's time. A fork of the test process, where torch, timm and fct are
already imported, starts in milliseconds and is otherwise the CLI as a user meets it: its own
process (SIGKILL, exit status, file locks and crash safety are real), its own environment
(replaced wholesale, as ``subprocess`` does), current directory, stdin from /dev/null, and
stdout/stderr as pipes, with `fct`'s own logging set up by `fct.cli.main` on a clean root
logger, and fct's registries as importing fct leaves them (a plugin an earlier test loaded
into this process is forgotten). An exception that escapes `main` prints its traceback and
exits 1, as the interpreter does, so the "never a traceback" assertions still see one.

What a fork cannot give is an interpreter that starts from nothing: the tests that need one
(a launcher whose environment must apply at startup, an installed console script, the
reference run `clean_tiny`, torchrun's ranks) keep ``subprocess`` (see docs/testing.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

#: The registries as a fresh interpreter has them: (registry, its entries), from
#: ``remember_registries`` (conftest, before any test runs).
_REGISTRIES: list[tuple[object, dict]] = []


def remember_registries() -> None:
    """Record fct's registries (methods, datasets, losses) as importing fct leaves them."""
    from fct.data.base import DATASETS
    from fct.losses import LOSSES
    from fct.methods.base import METHODS

    _REGISTRIES[:] = [(r, dict(r._entries)) for r in (METHODS, DATASETS, LOSSES)]


def _forget_plugins() -> None:
    """In the child: the registries as recorded, and no plugin module imported by a test
    (`fct --plugin` then imports and registers it again, as in a fresh interpreter)."""
    for registry, entries in _REGISTRIES:
        for name, obj in registry._entries.items():
            if entries.get(name) is not obj:
                sys.modules.pop(getattr(obj, "__module__", ""), None)
        registry._entries.clear()
        registry._entries.update(entries)
    for name in [m for m in sys.modules if m.startswith("fct_plugin_")]:
        del sys.modules[name]


def _child(
    argv: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    out_fd: int,
    err_fd: int,
    target: Callable[[], int | None] | None = None,
) -> int:
    """In the forked child: become `python -m fct ARGV` (or run ``target``, a program's
    ``main``, in a process set up alike); returns the exit status."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # The interpreter's defaults, not pytest's or the test's.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace" if fd == 2 else "strict",
            line_buffering=True,
            write_through=unbuffered or fd == 2,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    # pytest's capture handlers hang on the root logger; `fct` configures its own.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    _forget_plugins()
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = ["fct", *argv]
    from fct.cli import main

    try:
        code = target() if target is not None else main(list(argv))
    except SystemExit as e:
        code = e.code
    if code is None:
        return 0
    if not isinstance(code, int):
        print(code, file=sys.stderr)
        return 1
    return code


class Forked:
    """A `subprocess.Popen` look-alike for a forked `fct` (the parts the tests use)."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path | str,
        env: dict[str, str],
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        target: Callable[[], int | None] | None = None,
    ) -> None:
        self.args = ["fct", *argv]
        self.returncode: int | None = None
        pipes = {}
        for name, mode in (("stdout", stdout), ("stderr", stderr)):
            if mode == subprocess.PIPE:
                pipes[name] = os.pipe()
            elif mode == subprocess.DEVNULL:
                pipes[name] = (None, os.open(os.devnull, os.O_WRONLY))  # no read end
            else:
                raise ValueError(f"{name}={mode!r}: only PIPE and DEVNULL are supported")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                for r, _ in pipes.values():
                    if r is not None:
                        os.close(r)
                out_fd, err_fd = pipes["stdout"][1], pipes["stderr"][1]
                code = _child(argv, Path(cwd), env, out_fd, err_fd, target)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(BaseException):
                        stream.flush()
                os._exit(code & 0xFF)
        self.pid = pid
        for _, w in pipes.values():
            os.close(w)
        # Read ends as text files, closed by communicate() or by the caller (as Popen's).
        self.stdout = self.stderr = None
        if pipes["stdout"][0] is not None:
            self.stdout = open(pipes["stdout"][0], encoding="utf-8")  # noqa: SIM115
        if pipes["stderr"][0] is not None:
            self.stderr = open(pipes["stderr"][0], encoding="utf-8")  # noqa: SIM115

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        if end is None and self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        while self.poll() is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def drain(self) -> Callable[[], tuple[str, str]]:
        """Start reading both pipes to the end (a thread each: neither can fill up and block
        the child); returns what joins the readers and gives (stdout, stderr)."""
        texts: dict[str, str] = {}

        def read(name: str) -> None:
            stream = getattr(self, name)
            texts[name] = stream.read() if stream is not None else ""
            if stream is not None:
                stream.close()

        readers = [
            threading.Thread(target=read, args=(n,), daemon=True) for n in ("stdout", "stderr")
        ]
        for t in readers:
            t.start()

        def join() -> tuple[str, str]:
            for t in readers:
                t.join()
            return texts["stdout"], texts["stderr"]

        return join

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read both pipes to the end while waiting for the child."""
        join = self.drain()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return join()


def run(
    argv: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    target: Callable[[], int | None] | None = None,
) -> subprocess.CompletedProcess:
    """`fct ARGV` (or ``target``, as in `Forked`) to completion in a forked child; stdout and
    stderr captured as text."""
    proc = Forked(argv, cwd, env, target=target)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    nproc: int,
    argv: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    target: Callable[[], int | None] | None = None,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC -m fct ARGV` with forked ranks.

    Each rank is a `Forked` child with the variables torchrun gives its workers (RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, a rendezvous on a free local port,
    TORCHELASTIC_RUN_ID), so fct's process group forms as under torchrun (gloo on the CPU).
    As torchrun does, the first rank to fail ends the others. Returns one completed process
    for the launch: the exit status of the first rank seen failing (else 0), and every rank's
    stdout and stderr in rank order. ``target`` runs instead of fct's main, as in `Forked`.

    What this leaves out, the launcher itself (`fct run --nproc`, torchrun's agent), is run
    for real by the tests that keep `torchrun` (docs/testing.md).
    """
    port = _free_port()
    ranks = []
    for rank in range(nproc):
        rank_env = dict(env)
        rank_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_RUN_ID=f"forked-{port}",
        )
        ranks.append(Forked(argv, cwd, rank_env, target=target))
    joins = [proc.drain() for proc in ranks]
    end = time.monotonic() + timeout
    failed = None
    try:
        while None in [proc.poll() for proc in ranks]:  # every rank polled, every time
            if failed is None:
                failed = next((p for p in ranks if p.returncode not in (None, 0)), None)
                if failed is not None:  # torchrun stops the group when one worker fails
                    for proc in ranks:
                        proc.kill()
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(["torchrun", *ranks[0].args], timeout)
            time.sleep(0.01)
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    texts = [join() for join in joins]
    if failed is None:
        failed = next((p for p in ranks if p.returncode != 0), None)
    code = 0 if failed is None else failed.returncode
    out, err = ("".join(t[i] for t in texts) for i in (0, 1))
    return subprocess.CompletedProcess(["torchrun", *ranks[0].args], code, out, err)
