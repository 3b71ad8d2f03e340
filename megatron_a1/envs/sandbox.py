"""Run untrusted Python (a model's tool call) in a separate, limited process.

Library: :func:`run_code` / :func:`run_file` -> :class:`SandboxResult`. Command line::

    python -m megatron_a1.envs.sandbox --timeout S --memory-mb M [--max-processes N]
        [--max-output-bytes B] FILE.py

prints one JSON object: ``stdout``, ``stderr``, ``returncode``, ``timed_out``, ``reason``
(``ok``/``error``/``wall_timeout``/``cpu_timeout``/``output_limit``/``memory``/``killed``),
``output_truncated``, ``wall_s``, ``isolation``.

What limits what (each applied in the child between ``fork`` and ``exec``):

* wall time — the parent kills the child's whole process group (and its cgroup, if any);
* CPU time — ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL one second later);
* memory — ``RLIMIT_AS`` (address space; allocation fails with ``MemoryError``);
* processes — ``RLIMIT_NPROC`` for a non-root user (set to the user's current count + N). Linux
  never applies ``RLIMIT_NPROC`` to uid 0, so for root the child joins a fresh cgroup-v1 ``pids``
  group with ``pids.max = N`` when one is writable; ``isolation["processes"]`` says which;
* output — stdout and stderr are read through pipes and capped (the child is killed when it
  writes past the cap); files by ``RLIMIT_FSIZE``; no core dumps;
* a private temporary working directory (deleted afterwards), ``HOME`` there, a minimal
  environment (nothing of the parent's environment is passed on);
* network — a new, empty network namespace (``unshare(CLONE_NEWNET)``; a user namespace too when
  not root) so no interface but a down loopback exists. Where namespaces are unavailable, an
  audit hook in the child refuses ``socket.connect``/``bind``/``sendto``/``getaddrinfo``; that
  fallback stops Python code, not native code (ctypes). ``isolation["network"]`` says which.

Not isolated: the file system beyond the working directory (the child has the caller's file
permissions) — run rollout workers as an unprivileged user or in a container for that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache

__all__ = ["Limits", "SandboxResult", "run_code", "run_file", "isolation_support"]


@dataclass
class Limits:
    timeout_s: float = 10.0
    """Wall-clock limit (seconds); also the CPU-time limit unless ``cpu_s`` is set."""
    cpu_s: float | None = None
    """CPU-time limit (seconds); default ``timeout_s``."""
    memory_mb: int = 1024
    """Address-space limit of the child (MiB)."""
    max_processes: int = 16
    """Processes/threads the child may have at once (itself included)."""
    max_output_bytes: int = 64 * 1024
    """Cap per stream (stdout, stderr); the child is killed when it writes more."""
    max_file_bytes: int = 16 * 1024 * 1024
    """Largest file the child may write."""


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


_NET_HOOK = """
import sys
def _a1_no_network(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                 "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_a1_no_network)
del _a1_no_network
"""

_BOOT = """{hook}
import runpy, sys
sys.argv = [{main!r}]
runpy.run_path({main!r}, run_name="__main__")
"""


def _netns_flags() -> int:
    return os.CLONE_NEWNET if os.geteuid() == 0 else (os.CLONE_NEWUSER | os.CLONE_NEWNET)


@lru_cache(maxsize=1)
def _netns_available() -> bool:
    if not hasattr(os, "unshare"):
        return False
    code = f"import os; os.unshare({_netns_flags()})"
    try:
        return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pids_cgroup_root() -> str | None:
    """The writable cgroup-v1 ``pids`` directory this process belongs to, if any."""
    try:
        with open("/proc/mounts") as f:
            mounts = [ln.split() for ln in f]
        with open("/proc/self/cgroup") as f:
            own = {}
            for ln in f:
                _, ctrls, path = ln.rstrip("\n").split(":", 2)
                for c in ctrls.split(","):
                    own[c] = path
    except OSError:
        return None
    for m in mounts:
        if len(m) > 3 and m[2] == "cgroup" and "pids" in m[3].split(","):
            d = os.path.join(m[1], own.get("pids", "/").lstrip("/"))
            if os.access(d, os.W_OK) and os.path.exists(os.path.join(d, "cgroup.procs")):
                return d
    return None


@lru_cache(maxsize=1)
def isolation_support() -> dict:
    """What this machine can enforce: ``{"network": ..., "processes": ...}``."""
    if os.geteuid() != 0:
        procs = "rlimit"
    else:
        procs = "cgroup" if _pids_cgroup_root() else "none"
    return {"network": "namespace" if _netns_available() else "audit_hook", "processes": procs}


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


class _Cgroup:
    def __init__(self, root: str, max_pids: int):
        self.path = os.path.join(root, f"a1-sandbox-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.path)
        with open(os.path.join(self.path, "pids.max"), "w") as f:
            f.write(str(max_pids))

    def kill_all(self) -> None:
        for _ in range(100):
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # busy until the last killed task is reaped
                time.sleep(0.02)


def _reader(stream, cap: int, buf: bytearray, over: threading.Event) -> None:
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            return
        room = cap - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            over.set()  # keep draining so the child never blocks; the parent kills it


def run_file(path: str, limits: Limits | None = None) -> SandboxResult:
    """Run the Python file ``path`` under ``limits`` (see the module doc)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return run_code(f.read(), limits)


def run_code(code: str, limits: Limits | None = None) -> SandboxResult:
    """Run Python source ``code`` in a fresh sandboxed interpreter; never raises for what the
    code does (errors, limits) — only for failures to start the sandbox itself."""
    lim = limits or Limits()
    support = isolation_support()
    workdir = tempfile.mkdtemp(prefix="a1-sandbox-")
    main = os.path.join(workdir, "main.py")
    with open(main, "w", encoding="utf-8") as f:
        f.write(code)
    hook = "" if support["network"] == "namespace" else _NET_HOOK
    boot = _BOOT.format(hook=hook, main=main)
    cpu = max(1, int(round(lim.cpu_s if lim.cpu_s is not None else lim.timeout_s)))
    mem = int(lim.memory_mb) * 1024 * 1024
    cgroup = None
    if support["processes"] == "cgroup":
        try:
            cgroup = _Cgroup(_pids_cgroup_root(), lim.max_processes)
        except OSError:
            cgroup = None
    procs_mode = "cgroup" if cgroup else ("rlimit" if os.geteuid() != 0 else "none")
    nproc = _user_process_count() + lim.max_processes if os.geteuid() != 0 else None
    netflags = _netns_flags() if support["network"] == "namespace" else 0
    cgroup_procs = os.path.join(cgroup.path, "cgroup.procs") if cgroup else None

    def preexec() -> None:  # in the child, between fork and exec
        if cgroup_procs:
            with open(cgroup_procs, "w") as fh:
                fh.write(str(os.getpid()))
        if netflags:
            os.unshare(netflags)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.max_file_bytes, lim.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    out, err = bytearray(), bytearray()
    over = threading.Event()
    t0 = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-c", boot], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=preexec,
                                start_new_session=True)
        readers = [threading.Thread(target=_reader, args=(s, lim.max_output_bytes, b, over),
                                    daemon=True)
                   for s, b in ((proc.stdout, out), (proc.stderr, err))]
        for t in readers:
            t.start()
        deadline = t0 + lim.timeout_s
        while proc.poll() is None:
            if over.is_set():
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)
        if cgroup:
            cgroup.kill_all()
        proc.wait()
        _kill_group(proc.pid)  # children left in the group after the leader died
        for t in readers:
            t.join(timeout=2.0)
        for s in (proc.stdout, proc.stderr):
            s.close()
    finally:
        if cgroup:
            cgroup.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    rc = proc.returncode
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    if timed_out:
        reason = "wall_timeout"
    elif over.is_set():
        reason = "output_limit"
    elif rc == -signal.SIGXCPU:
        reason = "cpu_timeout"
    elif "MemoryError" in stderr:
        reason = "memory"
    elif rc == -signal.SIGKILL:
        reason = "killed"
    else:
        reason = "ok" if rc == 0 else "error"
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=rc,
                         timed_out=reason in ("wall_timeout", "cpu_timeout"), reason=reason,
                         output_truncated=over.is_set(), wall_s=round(time.monotonic() - t0, 3),
                         isolation={"network": support["network"], "processes": procs_mode})


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_a1.envs.sandbox",
                                description="Run a Python file in a limited, network-less "
                                            "process; print the result as JSON.")
    d = Limits()
    p.add_argument("file")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="wall/CPU seconds")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb)
    p.add_argument("--max-processes", type=int, default=d.max_processes)
    p.add_argument("--max-output-bytes", type=int, default=d.max_output_bytes)
    a = p.parse_args(argv)
    res = run_file(a.file, Limits(timeout_s=a.timeout, memory_mb=a.memory_mb,
                                  max_processes=a.max_processes,
                                  max_output_bytes=a.max_output_bytes))
    print(res.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
