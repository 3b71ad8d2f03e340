"""Run untrusted Python (a model's tool call) in a jail: namespaces, own uid, seccomp, tmpfs.

Library: :func:`run_code` / :func:`run_file` -> :class:`SandboxResult`. Command line::

    python -m megatron_a1.envs.sandbox --timeout S --memory-mb M [--max-processes N]
        [--max-output-bytes B] [--disk-mb D] [--no-strict] FILE.py

prints one JSON object: ``stdout``, ``stderr``, ``returncode``, ``timed_out``, ``reason``
(``ok``/``error``/``wall_timeout``/``cpu_timeout``/``output_limit``/``memory``/``killed``),
``output_truncated``, ``wall_s``, ``isolation`` (``namespaces``, ``namespaces_missing``,
``filesystem``: ``private_root`` or what replaced it, ``uid``, ``tag``: a per-call id on the jail's
command line).

How a call runs (the jail itself is :mod:`megatron_a1.envs.sandbox_jail`, its seccomp filter
:mod:`megatron_a1.envs.sandbox_seccomp`): the caller starts one interpreter (the supervisor)
with a scrubbed environment and the program on a memfd; the supervisor makes new PID, network,
IPC, UTS and cgroup namespaces and forks the namespace's init, which makes a private mount
namespace and forks the program. What holds what:

* the caller — invisible (other PID namespace) and unreachable (other uid) from the program;
  the program's parent is the namespace's init, not the caller;
* privileges — the program runs under a uid/gid of its own (``Limits.uid_base`` + the
  supervisor's PID; not root, no groups, no capabilities), ``no_new_privs``, and a seccomp
  filter denying ``setns``, ``unshare``, namespace flags to ``clone``, ``ptrace``, ``mount``,
  ``bpf``, ``keyctl``, ``perf_event_open``, ``io_uring`` and the kernel's admin calls;
* file system — a fresh root holding read-only ``/usr``, ``/etc``, the Python installation, the
  venv and the ``megatron_a1`` package's code (so that trusted checkers run in the jail can
  import it; its data directories, bundled tasks with their answers, are hidden); the host's
  other directories, the caller's files included, do not exist there;
  ``/etc/shadow`` and the like stay unreadable to the program's uid; a fresh ``/proc`` that shows
  only the sandbox's processes (``/proc/sys`` read-only); ``/dev`` with null, zero, full,
  random, urandom; one tmpfs of ``Limits.disk_mb`` shown as the working directory
  ``/sandbox`` (also ``HOME``), ``/tmp`` and ``/dev/shm``; hostname ``sandbox``;
* network — an empty network namespace (only a down loopback);
* wall time — at the deadline (or when the output cap is passed) the supervisor SIGKILLs the
  namespace's init and the kernel kills everything in the namespace; the caller reads the pipes
  without blocking and returns within ``timeout_s + 1`` s, whatever the program does;
* CPU time, memory, file size, process count — ``RLIMIT_CPU`` (SIGXCPU at the limit),
  ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC`` (per uid, and the uid is this sandbox's
  alone); no core dumps. ``RLIMIT_AS`` is per process: a program may hold up to
  ``max_processes x memory_mb``, and only the caller's own memory cgroup bounds that;
* leftovers — none: when the program's process ends, its init exits and the kernel kills the
  rest of the namespace; the mounts live only in the jail's mount namespace; no cgroup and no
  host directory is created. If the caller dies, the supervisor gets SIGTERM
  (``PR_SET_PDEATHSIG``) and kills the namespace; if the supervisor dies, its init gets SIGKILL.

Needs root (or ``CAP_SYS_ADMIN``): the rollout workers and CI run as root. ``Limits.strict``
(default) refuses to run when any of this is unavailable (:class:`SandboxUnavailable`);
``strict=False`` runs with whatever is available and logs what is missing once, loudly.
"""
from __future__ import annotations

import argparse
import json
import logging
import marshal
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache

__all__ = ["Limits", "SandboxResult", "SandboxUnavailable", "run_code", "run_file",
           "isolation_support"]

log = logging.getLogger(__name__)

_JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_jail.py")
_WORKDIR = "/sandbox"
# this package's source (code only), so that trusted checkers run in the jail can import it
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILL_GRACE_S = 0.3  # supervisor's time to kill and reap the namespace before it is SIGKILLed


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be built on this machine (strict mode)."""


@dataclass
class Limits:
    timeout_s: float = 10.0
    """Wall-clock limit (seconds, start-up included); also the CPU-time limit unless ``cpu_s``."""
    cpu_s: float | None = None
    """CPU-time limit (seconds); default ``timeout_s``."""
    memory_mb: int = 1024
    """Address-space limit of each process of the program (MiB)."""
    max_processes: int = 16
    """Processes/threads the program may have at once (itself included)."""
    max_output_bytes: int = 64 * 1024
    """Cap per stream (stdout, stderr); the program is killed when it writes more."""
    max_file_bytes: int = 16 * 1024 * 1024
    """Largest file the program may write."""
    disk_mb: int = 64
    """Size of the tmpfs behind the working directory, ``/tmp`` and ``/dev/shm`` (MiB)."""
    strict: bool = True
    """Refuse to run (:class:`SandboxUnavailable`) when a namespace, the private file system,
    the uid switch or seccomp is unavailable, instead of running with less isolation."""
    uid_base: int = 1 << 30
    """The program runs as uid/gid ``uid_base + supervisor PID``; keep this range
    (``uid_base .. uid_base + pid_max``) free of real users."""
    ro_paths: tuple[str, ...] = ()
    """Extra host directories the program may read (bound read-only at the same path)."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    reason: str
    output_truncated: bool = False
    wall_s: float = 0.0
    isolation: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def _ro_paths(extra: tuple[str, ...]) -> list[str]:
    """Host directories bound read-only: system, Python installation, venv; no nesting."""
    want = ["/usr", "/etc", sys.prefix, sys.base_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), _PACKAGE, *extra]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.isdir(top) and not os.path.islink(top):
            want.append(top)  # not merged into /usr on this system
    paths = sorted({os.path.realpath(p) for p in want if os.path.isdir(p)})
    out: list[str] = []
    for p in paths:  # sorted: a parent comes before its children
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


_CODE_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".typed")


@lru_cache(maxsize=1)
def _package_data_dirs() -> tuple[str, ...]:
    """Directories of this package that hold data (bundled tasks and their answers): hidden
    in the jail, where only the package's code is readable."""
    out = []
    for root, dirs, files in os.walk(_PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(not f.endswith(_CODE_SUFFIXES) for f in files):
            out.append(root)
    return tuple(out)


def _staging_dir(ro: list[str]) -> str:
    """A host directory to mount the jail's root on (in the jail's mount namespace only)."""
    for cand in ("/mnt", "/media", "/srv", "/opt", "/tmp", "/var"):
        inside = any(p == cand or p.startswith(cand + "/") for p in ro)
        if os.path.isdir(cand) and not os.path.islink(cand) and not inside:
            return cand
    raise SandboxUnavailable("no directory to stage the sandbox's root on (tried /mnt, /media, "
                             "/srv, /opt, /tmp, /var: missing or holding a read-only path)")


def _config(lim: Limits, status_fd: int) -> dict:
    cpu = max(1, int(round(lim.cpu_s if lim.cpu_s is not None else lim.timeout_s)))
    mem = int(lim.memory_mb) * 1024 * 1024
    ro = _ro_paths(tuple(lim.ro_paths))
    return {
        "caller_pid": os.getpid(), "status_fd": status_fd, "strict": bool(lim.strict),
        "uid_base": int(lim.uid_base), "disk_bytes": int(lim.disk_mb) * 1024 * 1024,
        "ro_paths": ro, "hidden_paths": list(_package_data_dirs()),
        "new_root": _staging_dir(ro), "workdir": _WORKDIR,
        "rlimits": {"RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": [mem, mem],
                    "RLIMIT_FSIZE": [lim.max_file_bytes, lim.max_file_bytes],
                    "RLIMIT_CORE": [0, 0],
                    "RLIMIT_NPROC": [lim.max_processes, lim.max_processes]},
        "tag": uuid.uuid4().hex[:12],
    }


def _env() -> dict:
    # USER/LOGNAME: the program's uid has no passwd entry, and getpass.getuser() reads these
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": _WORKDIR, "TMPDIR": "/tmp",
            "USER": "sandbox", "LOGNAME": "sandbox",
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}


def run_file(path: str, limits: Limits | None = None) -> SandboxResult:
    """Run the Python file ``path`` under ``limits`` (see the module doc)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return run_code(f.read(), limits)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_code(code: str, limits: Limits | None = None) -> SandboxResult:
    """Run Python source ``code`` in a fresh jail; never raises for what the code does (errors,
    limits) — only :class:`SandboxUnavailable` when the jail cannot be built (strict mode)."""
    lim = limits or Limits()
    t0 = time.monotonic()
    deadline = t0 + lim.timeout_s
    code_fd = os.memfd_create("a1-sandbox-code", os.MFD_CLOEXEC)
    status_r, status_w = os.pipe()
    try:
        data = memoryview(code.encode("utf-8", errors="surrogateescape"))
        while data:
            data = data[os.write(code_fd, data):]
        os.lseek(code_fd, 0, os.SEEK_SET)
        cfg = _config(lim, status_w)
        # the supervisor's PR_SET_PDEATHSIG fires when the *thread* that started it ends: this
        # thread stays in this call until the supervisor is gone
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", _JAIL,
                                 marshal.dumps(cfg).hex()],
                                stdin=code_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w,), env=_env(), cwd="/",
                                start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(code_fd)
        os.close(status_w)
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    caps = {"stdout": lim.max_output_bytes, "stderr": lim.max_output_bytes, "status": 1 << 16}
    over = timed_out = False
    killed_at = None
    sel = selectors.DefaultSelector()
    for name, fd in (("stdout", proc.stdout.fileno()), ("stderr", proc.stderr.fileno()),
                     ("status", status_r)):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    try:
        while sel.get_map():
            now = time.monotonic()
            if killed_at is None and (over or now >= deadline):
                timed_out = not over
                killed_at = now
                _kill(proc.pid, signal.SIGTERM)  # the supervisor kills the namespace
            if killed_at is not None:
                if proc.poll() is None and now >= killed_at + _KILL_GRACE_S:
                    _kill(proc.pid, signal.SIGKILL)  # its init follows (PDEATHSIG)
                if now >= killed_at + 0.8:
                    break  # whatever still holds a pipe does not hold the caller
                wait = 0.05
            else:
                wait = max(0.0, min(deadline - now, 0.25))
            for key, _ in sel.select(wait):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.data]
                room = caps[key.data] - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room and key.data != "status":
                    over = True  # keep draining so nothing blocks; the namespace is killed
            if not sel.get_map() and proc.poll() is None and killed_at is None:
                # pipes closed but the supervisor still reaping: wait a moment, then go on
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out, killed_at = True, time.monotonic()
                    _kill(proc.pid, signal.SIGTERM)
    finally:
        sel.close()
        if proc.poll() is None and killed_at is None:  # interrupted (KeyboardInterrupt, ...)
            _kill(proc.pid, signal.SIGTERM)
            killed_at = time.monotonic()
        try:
            proc.wait(timeout=_KILL_GRACE_S if killed_at is not None else None)
        except subprocess.TimeoutExpired:
            _kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
        os.close(status_r)
    status = _parse_status(bufs["status"])
    if "setup_error" in status:
        raise SandboxUnavailable(f"sandbox could not be built: {status['setup_error']} (run as "
                                 "root, or pass Limits(strict=False) to run with less isolation)")
    if "exit" in status:
        rc = -status["signal"] if status["signal"] else status["exit"]
    else:
        rc = -signal.SIGKILL if killed_at is not None else None
    stdout = bufs["stdout"].decode("utf-8", errors="replace")
    stderr = bufs["stderr"].decode("utf-8", errors="replace")
    if timed_out:
        reason = "wall_timeout"
    elif over:
        reason = "output_limit"
    elif rc == -signal.SIGXCPU:
        reason = "cpu_timeout"
    elif "MemoryError" in stderr:
        reason = "memory"
    elif rc is None or rc < 0:
        reason = "killed"
    else:
        reason = "ok" if rc == 0 else "error"
    iso = status.get("isolation", {})
    _warn_degraded(iso)
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=rc,
                         timed_out=reason in ("wall_timeout", "cpu_timeout"), reason=reason,
                         output_truncated=over, wall_s=round(time.monotonic() - t0, 3),
                         isolation=dict(iso, tag=cfg["tag"]))


def _parse_status(raw: bytes) -> dict:
    """The jail's status lines (hex of ``marshal``-ed dicts), merged."""
    out: dict = {"isolation": {}}
    for line in raw.splitlines():
        try:
            obj = marshal.loads(bytes.fromhex(line.decode("ascii")))
        except (ValueError, EOFError, TypeError):
            continue
        iso = obj.pop("isolation", None)
        if iso:
            out["isolation"].update(iso)
        out.update(obj)
    return out


_warned: set[str] = set()


def _warn_degraded(iso: dict) -> None:
    missing = list(iso.get("namespaces_missing") or ())
    if iso.get("filesystem", "private_root") != "private_root":
        missing.append(iso["filesystem"])
    msg = ", ".join(missing)
    if msg and msg not in _warned:
        _warned.add(msg)
        log.warning("SANDBOX RUNS WITH LESS ISOLATION (strict=False): %s", msg)


@lru_cache(maxsize=1)
def isolation_support() -> dict:
    """What this machine enforces, from one trial run without ``strict``:
    ``{"namespaces": [...], "namespaces_missing": [...], "filesystem": ..., "uid": ...}``."""
    r = run_code("pass", Limits(timeout_s=30, strict=False))
    return {k: v for k, v in r.isolation.items() if k != "tag"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_a1.envs.sandbox",
                                description="Run a Python file in the sandbox (own namespaces, "
                                            "uid, seccomp filter, tmpfs); print the result as "
                                            "JSON.")
    d = Limits()
    p.add_argument("file")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="wall/CPU seconds")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb)
    p.add_argument("--max-processes", type=int, default=d.max_processes)
    p.add_argument("--max-output-bytes", type=int, default=d.max_output_bytes)
    p.add_argument("--disk-mb", type=int, default=d.disk_mb, help="tmpfs size of the work dir")
    p.add_argument("--no-strict", action="store_true",
                   help="run with whatever isolation is available instead of refusing")
    a = p.parse_args(argv)
    res = run_file(a.file, Limits(timeout_s=a.timeout, memory_mb=a.memory_mb,
                                  max_processes=a.max_processes,
                                  max_output_bytes=a.max_output_bytes, disk_mb=a.disk_mb,
                                  strict=not a.no_strict))
    print(res.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
