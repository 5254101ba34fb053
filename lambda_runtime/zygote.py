"""A fork server for execution environments: cold starts pay a fork, not an interpreter start.

Starting `python` and importing the runtime costs 30-50 ms per environment; forking a process
that already did both costs about 1 ms. The zygote is a small single-threaded process started
once per service (`python -S -c ...`, so it has no state of the service in it) that preloads the
runtime's modules and forks an environment process on request:

    service -> zygote   b"S" + cwd, with two descriptors attached (SCM_RIGHTS): the runtime's
                        end of its channel and the log stream for its stdout and stderr
    zygote  -> service  b"P <pid>"         the new environment process
    zygote  -> service  b"X <pid> <code>"  it exited (code as subprocess reports it: negative for
                                            a signal), so the service learns exit statuses of
                                            processes that are not its own children

Each environment process starts its own session (its whole tree can be signalled) and runs
`bootstrap` as if started afresh. Python re-seeds `random` after a fork by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_CODE = "from lambda_runtime.zygote import serve; serve()"
_MAX_MSG = 4096


class ZygoteError(OSError):
    """The fork server could not start an environment process."""


class ForkedProcess:
    """A process the zygote forked: pid, exit status (as Popen.returncode), wait()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """Service side of the fork server."""

    def __init__(self, pythonpath: str) -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _CODE, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal goes to the service, not here
        )
        theirs.close()
        self._lock = threading.Lock()  # one spawn request at a time
        self._replies: list[bytes] = []
        self._reply_ready = threading.Condition()
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="lambda-zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._sock.recv(_MAX_MSG)
            except OSError:
                msg = b""
            if not msg:
                with self._reply_ready:
                    self._closed = True
                    self._reply_ready.notify_all()
                for orphan in list(self._children.values()):
                    if orphan.returncode is None:  # cannot learn it any more: treat as killed
                        orphan._exited(-signal.SIGKILL)
                return
            if msg.startswith(b"X "):
                _, pid_s, code_s = msg.split()
                pid, code = int(pid_s), int(code_s)
                with self._reply_ready:
                    gone = self._children.pop(pid, None)
                    if gone is None:  # exited before its spawn reply was handled
                        self._early_exits[pid] = code
                if gone is not None:
                    gone._exited(code)
            else:
                with self._reply_ready:
                    self._replies.append(msg)
                    self._reply_ready.notify_all()

    def spawn(self, channel: socket.socket, log_fd: int, cwd: str) -> ForkedProcess:
        """Fork an environment process that runs the runtime on `channel`, logging to log_fd."""
        with self._lock:
            try:
                socket.send_fds(self._sock, [b"S" + os.fsencode(cwd)], [channel.fileno(), log_fd])
            except OSError as exc:
                raise ZygoteError(exc.errno, f"fork server unreachable: {exc}") from exc
            deadline = time.monotonic() + 10.0
            with self._reply_ready:
                while not self._replies:
                    if self._closed or not self._reply_ready.wait(deadline - time.monotonic()):
                        raise ZygoteError(0, "fork server did not answer a spawn request")
                reply = self._replies.pop(0)
                if not reply.startswith(b"P "):
                    raise ZygoteError(0, reply.decode(errors="replace"))
                child = ForkedProcess(int(reply.split()[1]))
                early = self._early_exits.pop(child.pid, None)
                if early is None:
                    self._children[child.pid] = child
            if early is not None:
                child._exited(early)
            return child

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def close(self) -> None:
        """Stop the fork server (environments it started are stopped by their owners)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=2.0)


# ---- the zygote process ----------------------------------------------------------------------


def _child(control: socket.socket, wake_r: int, wake_w: int, fds: list[int], cwd: str) -> None:
    """In the forked child: become a fresh environment process and run the runtime."""
    code = 0
    try:
        control.close()
        os.close(wake_r)
        os.close(wake_w)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()
        channel_fd, log_fd = fds
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(cwd)
        from lambda_runtime import bootstrap

        bootstrap.run_on_fd(channel_fd)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            control.send(f"X {pid} {code}".encode())


def serve() -> None:
    """Main of the zygote process: `python -S -c ... FD`."""
    control = socket.socket(fileno=int(sys.argv[1]))
    # Everything an environment imports before user code, imported once here.
    import json  # noqa: F401
    import logging  # noqa: F401
    import traceback  # noqa: F401

    from lambda_runtime import bootstrap, namespace  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import select

    while True:
        try:
            ready, _, _ = select.select([control.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(control)
        if control.fileno() not in ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(control, _MAX_MSG, 2)
        except OSError:
            msg, fds = b"", []
        if not msg:  # the service is gone
            return
        if not msg.startswith(b"S") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            control.send(b"E bad spawn request")
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            control.send(f"E fork failed: {exc}".encode())
            continue
        if pid == 0:
            _child(control, wake_r, wake_w, fds, os.fsdecode(msg[1:]))
        for fd in fds:
            os.close(fd)
        control.send(f"P {pid}".encode())
        _reap(control)
