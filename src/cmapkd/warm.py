"""Warm start for the pipeline's stage processes (`cmapkd <stage>`, what dvc.yaml runs).

Every DVC stage is a new Python process, and importing torch, torchvision (which pulls in
torch._dynamo), open_clip and transformers takes ~4.5 s on the 2-core default machine: over six of
the ~30 minutes of a full default `dvc repro`, whose 82 stage processes mostly run for 10-40 s.
So `cmapkd <stage>` asks a small local server that has imported those libraries already to fork a
child for the stage. The child takes over the caller's stdin/stdout/stderr (passed over a Unix
socket), working directory, environment, umask and arguments, imports the stage module from disk
and runs it as `python -m <module>` would; the caller waits, forwards SIGINT/SIGTERM/SIGHUP to it
and exits with its status. DVC sees an ordinary command.

- The server imports third-party libraries only (no cmapkd code besides this file), so every stage
  runs the sources as they are on disk. Its socket name is a digest of the interpreter, sys.path,
  the working directory, the environment (less DVC's per-stage DVC_STAGE) and this file, so another
  venv, environment or checkout gets its own server.
- The first `cmapkd <stage>` starts the server in the background and runs in process itself; the
  server exits after CMAPKD_WARM_IDLE seconds (default 120) without a stage to run.
- CMAPKD_WARM=0 turns this off (every stage runs in its own process), as does a torchrun launch.
- The socket sits in a directory only the user can open, and the server checks the peer's uid.
  Its log is next to it (`<tmp>/cmapkd-warm-<uid>/<digest>.log`).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# imported by the server before it forks: the slow imports of every stage
PRELOAD = ("numpy", "torch", "torchvision", "open_clip", "transformers", "timm", "safetensors", "yaml", "tqdm",
           "dvclive")
# environment variables that differ between the stages of one `dvc repro` or between shells, and that
# no preloaded library reads at import time (the child still gets the caller's values)
VOLATILE_ENV = ("DVC_STAGE", "CMAPKD_WARM", "CMAPKD_WARM_IDLE", "_", "OLDPWD", "PWD", "SHLVL")
ENV_SWITCH = "CMAPKD_WARM"
ENV_IDLE = "CMAPKD_WARM_IDLE"
_HEADER = struct.Struct("!Q")


def enabled() -> bool:
    """Off with CMAPKD_WARM=0, and under torchrun (each rank is its own process by design)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ


def socket_dir() -> Path | None:
    """The user's private socket folder, or None when it cannot be made private."""
    d = Path(tempfile.gettempdir()) / f"cmapkd-warm-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return d


def server_key(cwd: str | None = None) -> str:
    """Digest of everything a preloaded library could have read at import time, plus this file."""
    env = sorted((k, v) for k, v in os.environ.items() if k not in VOLATILE_ENV)
    payload = json.dumps([sys.executable, sys.version, sys.path[1:], cwd or os.getcwd(), env])
    h = hashlib.sha256(payload.encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:20]


def socket_path() -> Path | None:
    d = socket_dir()
    if d is None:
        return None
    path = d / f"{server_key()}.sock"
    return path if len(str(path)) < 100 else None  # AF_UNIX path limit (108 bytes)


# ---------------------------------------------------------------------------------------- client


def run(module: str, args: list[str]) -> int | None:
    """Run `python -m <module> <args>` in a child of the warm server and return its exit status;
    None when no server took it (none running yet, warm start off, or an error before the child
    started): the caller then runs the module itself."""
    if not enabled():
        return None
    path = socket_path()
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        start_server(path)
        return None
    with sock:
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps({"module": module, "argv": [module, *args], "cwd": os.getcwd(),
                              "env": dict(os.environ), "umask": umask}).encode()
        try:
            socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
            sock.sendall(request)
            reply = sock.makefile("r")
            first = reply.readline()
        except OSError:
            return None
        if not first:
            return None  # the server closed the connection before starting anything
        pid = int(json.loads(first)["pid"])

        def forward(signum, _frame):
            try:
                os.killpg(pid, signum)
            except OSError:
                pass

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        last = reply.readline()
        if not last:
            forward(signal.SIGKILL, None)
            print(f"cmapkd: the warm-start server ended while running {module} (pid {pid}); "
                  f"see {path.with_suffix('.log')}, or run with {ENV_SWITCH}=0", file=sys.stderr)
            return 1
        status = int(json.loads(last)["status"])
        return status if status >= 0 else 128 - status  # killed by signal N -> 128 + N, as a shell reports


def start_server(path: Path) -> None:
    """Start the server in the background (its own session, no terminal, no inherited files)."""
    try:
        with open(path.with_suffix(".log"), "ab") as log:
            subprocess.Popen([sys.executable, "-m", "cmapkd.warm", "serve", str(path)], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, close_fds=True, start_new_session=True)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- server


def serve(path: Path, idle: float) -> int:
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return 0  # another server is already listening
            except OSError:
                path.unlink(missing_ok=True)  # left by a server that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        return 0  # lost a start-up race to another server
    listener.listen(16)
    inode = path.stat().st_ino
    _log(f"listening on {path}")
    t0 = time.perf_counter()
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as e:  # a library that fails here fails in the stage too, with its own message
            _log(f"preload {name} failed: {e!r}")
    _log(f"preloaded {', '.join(PRELOAD)} in {time.perf_counter() - t0:.1f} s")

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the pipe
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    running: dict[int, tuple[socket.socket, str, float]] = {}  # child pid -> (client, module, start)
    orphaned: set[int] = set()  # children whose client went away
    last_work = time.monotonic()
    try:
        while True:
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    conn, module, start = running.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    _log(f"{module} (pid {pid}) ended with {code} after {time.perf_counter() - start:.1f} s")
                    try:
                        conn.sendall((json.dumps({"status": code}) + "\n").encode())
                    except OSError:
                        pass
                    conn.close()
                    orphaned.discard(pid)
                    last_work = time.monotonic()
            if not running and time.monotonic() - last_work > idle:
                _log(f"idle for {idle:.0f} s, exiting")
                return 0
            if not path.exists() or path.stat().st_ino != inode:
                _log("socket file removed or replaced, exiting")
                return 0
            watch = [conn for pid, (conn, _, _) in running.items() if pid not in orphaned]
            try:
                ready, _, _ = select.select([listener, wake_r, *watch], [], [], 1.0)
            except InterruptedError:
                continue
            for r in ready:
                if r is wake_r:
                    os.read(wake_r, 512)
                elif r is listener:
                    _accept(listener, running, close_in_child=[wake_r, wake_w])
                    last_work = time.monotonic()
                else:  # a client's connection: readable only when the client has gone (EOF)
                    pid = next(p for p, (c, _, _) in running.items() if c is r)
                    orphaned.add(pid)
                    _log(f"client of pid {pid} went away; killing it")
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
    finally:
        try:
            if path.exists() and path.stat().st_ino == inode:
                path.unlink()
        except OSError:
            pass


def _accept(listener: socket.socket, running: dict, close_in_child: list[int]) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            raise PermissionError(f"peer uid {uid}")
        conn.settimeout(10.0)
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(head) != _HEADER.size or len(fds) != 3:
            raise ValueError("malformed request header")
        size = _HEADER.unpack(head)[0]
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ConnectionError("request cut short")
            body += chunk
        request = json.loads(body)
        conn.settimeout(None)
    except Exception as e:
        _log(f"rejected a request: {e!r}")
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        others = [c for c, _, _ in running.values()]
        _child(request, fds, close=[listener, conn, *others], close_fds=close_in_child)
    for fd in fds:
        os.close(fd)
    running[pid] = (conn, request["module"], time.perf_counter())
    try:
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    except OSError:
        pass
    _log(f"{request['module']} {' '.join(request['argv'][1:])[:200]} -> pid {pid}")


def _child(request: dict, fds: list[int], close: list[socket.socket], close_fds: list[int]) -> None:
    """In the forked child: become the caller's process and run its module. Never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: the client's signals and clean-up reach the whole stage
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in close:
            s.close()
        for fd in close_fds:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        _reopen_std_streams()
        sys.argv = list(request["argv"])
        sys.path[0] = request["cwd"]  # what `python -m` puts first
        code = _run_module(request["module"])
    except BaseException:  # noqa: BLE001 - report anything before the exit below
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reopen_std_streams() -> None:
    """New sys.stdin/stdout/stderr on fds 0-2, buffered as a fresh interpreter would buffer them."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    enc, err = sys.__stdout__.encoding, sys.__stdout__.errors
    sys.stdin = sys.__stdin__ = open(0, "r", encoding=sys.__stdin__.encoding, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=enc, errors=err, closefd=False,
                                       buffering=1 if os.isatty(1) else -1)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding=enc, errors="backslashreplace", closefd=False, buffering=1)
    if unbuffered:
        sys.stdout.reconfigure(write_through=True)


def _run_module(module: str) -> int:
    """`python -m <module>` semantics: run as __main__, SystemExit -> status, traceback -> 1."""
    import atexit
    import runpy

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # die by SIGINT, as the interpreter does
        code = 130
    except BaseException:  # noqa: BLE001
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    return code


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "serve":
        return serve(Path(argv[1]), float(os.environ.get(ENV_IDLE, "120")))
    print("usage: python -m cmapkd.warm serve SOCKET   (started by `cmapkd <stage>`; see the module docstring)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
