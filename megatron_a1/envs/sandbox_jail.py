"""The sandbox's jail: run by path as ``python -I -S -B sandbox_jail.py CONFIG``.

Standard library only, no package imports: it runs before ``site`` and inside the jail, and
it avoids modules that pull in ``re``/``enum`` (``json``, ``signal``): every millisecond of
start-up is paid on each call. ``CONFIG`` is the caller's dict, ``marshal``-ed and hex-encoded
(same interpreter on both ends). One interpreter start serves three processes (forks, no
second ``exec``):

``supervisor`` (the process :func:`megatron_a1.envs.sandbox.run_code` starts; host PID namespace)
    ``PR_SET_PDEATHSIG(SIGTERM)``; reads the program from stdin (a memfd); ``unshare``\\ s new
    PID, network, IPC, UTS and cgroup namespaces; forks ``init``; on SIGTERM (the caller's
    deadline, or the caller's death) SIGKILLs ``init``; reaps it and exits. The program can
    neither see nor signal it.
``init`` (PID 1 of the new PID namespace)
    ``PR_SET_PDEATHSIG(SIGKILL)`` (dies with the supervisor); a private mount namespace whose
    root is a fresh tmpfs holding read-only binds of ``/usr``, ``/etc``, the Python installation
    and the venv, a fresh ``/proc`` (read-only ``/proc/sys``), a minimal ``/dev``, and one
    size-limited tmpfs shown as ``/sandbox`` (working dir, ``HOME``), ``/tmp`` and ``/dev/shm``
    (``pivot_root``; the host's tree is detached); hostname ``sandbox``; forks ``user``, reaps
    every orphan, and exits when ``user`` exits, which makes the kernel SIGKILL everything left
    in the namespace. Signals from inside the namespace cannot reach it (PID 1 without
    handlers; different uid).
``user`` (PID 2)
    rlimits; a uid/gid of its own (``uid_base`` + the supervisor's host PID: unique among live
    sandboxes, so ``RLIMIT_NPROC`` counts only this sandbox's processes), no supplementary
    groups, no capabilities; ``no_new_privs`` and the seccomp filter of
    :mod:`sandbox_seccomp`; then ``site`` (the venv's packages) and the program as
    ``__main__``.

Status goes to the caller as lines on ``status_fd`` (hex of ``marshal``-ed dicts; closed in
``user`` before the program runs):
``{"isolation": {...}}`` from ``init`` before the program starts, ``{"exit": rc, "signal": s}``
when it ends, ``{"setup_error": "..."}`` when the jail cannot be built.
"""
import _signal as signal  # the C module: ``signal`` would import enum (start-up time)
import ctypes
import marshal
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_seccomp  # noqa: E402  (a sibling file; this script runs by path, before site)

del sys.path[0]
try:
    _FILTER = sandbox_seccomp.build_filter()
except OSError as _e:  # an architecture without a filter: strict mode refuses in the program
    _FILTER, _FILTER_ERROR = None, _e

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
_RW = "/.rw"  # staging mount of the writable tmpfs, detached before the program runs
NAMESPACES = {"pid": os.CLONE_NEWPID, "net": os.CLONE_NEWNET, "ipc": os.CLONE_NEWIPC,
              "uts": os.CLONE_NEWUTS, "cgroup": os.CLONE_NEWCGROUP}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)),
           f"mount({src!r} -> {dst!r}, {fstype!r})")


def _bind(src: str, dst: str, flags: int) -> None:
    _mount(src, dst, None, _MS_BIND)
    _mount(None, dst, None, _MS_BIND | _MS_REMOUNT | flags)


def _status(fd: int, obj: dict) -> None:
    try:
        os.write(fd, marshal.dumps(obj).hex().encode() + b"\n")
    except OSError:
        pass


def _build_root(cfg: dict, new_root: str, uid: int, code: bytes) -> None:
    """Mount the jail's file system at ``new_root`` and ``pivot_root`` into it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    _mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    r = lambda p: new_root + p  # noqa: E731
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr symlinks
        if os.path.islink("/" + top):
            os.symlink(os.readlink("/" + top), r("/" + top))
    os.mkdir(r("/proc"))
    _mount("proc", r("/proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _bind(r("/proc/sys"), r("/proc/sys"), _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(r("/dev"))
    _mount("tmpfs", r("/dev"), "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for node in _DEV_NODES:
        open(r("/dev/" + node), "w").close()
        _bind("/dev/" + node, r("/dev/" + node), _MS_NOSUID | _MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, r("/dev/" + name))
    size = int(cfg["disk_bytes"])
    os.mkdir(r(_RW))
    _mount("tmpfs", r(_RW), "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={size},nr_inodes={max(1024, size // 4096)},mode=755")
    for sub, where, mode in (("sandbox", cfg["workdir"], 0o700), ("tmp", "/tmp", 0o1777),
                             ("shm", "/dev/shm", 0o1777)):
        os.mkdir(r(_RW + "/" + sub))
        os.chmod(r(_RW + "/" + sub), mode)
        if sub == "sandbox":
            os.chown(r(_RW + "/" + sub), uid, uid)
        os.makedirs(r(where), exist_ok=True)
        _mount(r(_RW + "/" + sub), r(where), None, _MS_BIND)
    with open(r(cfg["workdir"] + "/main.py"), "wb") as f:
        f.write(code)
    os.chown(r(cfg["workdir"] + "/main.py"), uid, uid)
    # The read-only binds go last, over the fresh /tmp too: a checkout or venv under /tmp
    # (CI clones, pytest's tmp_path) must stay visible, not be shadowed by the writable tmpfs.
    for path in cfg["ro_paths"]:
        os.makedirs(r(path), exist_ok=True)
        _bind(path, r(path), _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for path in cfg["hidden_paths"]:  # an empty read-only directory in its place
        _mount("tmpfs", r(path), "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               "size=4k,nr_inodes=1,mode=755")
    _check(_libc.umount2(r(_RW).encode(), _MNT_DETACH), "umount2(staging)")
    os.rmdir(r(_RW))
    os.chdir(new_root)
    nr = _SYS_PIVOT_ROOT[os.uname().machine]
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "umount2(old root)")
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _init(cfg: dict, uid: int, code: bytes, alive_r: int) -> None:
    """PID 1 of the new namespace: build the jail, run ``user``, reap, report. Never returns
    in ``init``; returns in ``user``."""
    status_fd = cfg["status_fd"]
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    import select
    if select.select([alive_r], [], [], 0)[0]:  # the supervisor died before the prctl
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)  # a PID 1 without handlers ignores its namespace
    iso = {"uid": uid}
    try:
        os.unshare(os.CLONE_NEWNS)
        _build_root(cfg, cfg["new_root"], uid, code)
        iso["filesystem"] = "private_root"
    except (OSError, SetupError) as e:
        if cfg["strict"]:
            _status(status_fd, {"setup_error": f"private file system: {e}"})
            os._exit(1)
        iso["filesystem"] = f"host (private root unavailable: {e})"
        import tempfile  # a host directory, removed when the program ends (not if killed)
        cfg["workdir"] = tempfile.mkdtemp(prefix="a1-sandbox-")
        os.environ["HOME"] = os.environ["TMPDIR"] = cfg["workdir"]
        with open(os.path.join(cfg["workdir"], "main.py"), "wb") as f:
            f.write(code)
        if os.geteuid() == 0:
            for p in (cfg["workdir"], os.path.join(cfg["workdir"], "main.py")):
                os.chown(p, uid, uid)
    try:
        _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    except SetupError:
        pass
    _status(status_fd, {"isolation": iso})
    devnull = os.open("/dev/null", os.O_RDWR)
    user = os.fork()
    if user == 0:
        os.dup2(devnull, 0)
        for fd in (devnull, alive_r):
            os.close(fd)
        return  # status_fd stays open until the privileges are dropped
    os.close(devnull)
    while True:  # reap orphans until the program's own process ends
        pid, st = os.waitpid(-1, 0)
        if pid == user:
            sig = os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0
            _status(status_fd, {"exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                                "signal": sig})
            if iso["filesystem"] != "private_root":
                import shutil
                shutil.rmtree(cfg["workdir"], ignore_errors=True)
            os._exit(0)


def _count_own_processes() -> int:
    uid, n = os.getuid(), 0
    for name in os.listdir("/proc"):
        try:
            n += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return n


def _drop_privileges(cfg: dict, uid: int) -> None:
    import resource

    for name, value in cfg["rlimits"].items():
        if name == "RLIMIT_NPROC" and os.geteuid() != 0:
            # no uid of our own: the limit counts every process of the caller's uid
            value = [v + _count_own_processes() for v in value]
        resource.setrlimit(getattr(resource, name), tuple(value))
    if os.geteuid() != 0 and cfg["strict"]:
        raise SetupError("not root: the program cannot get a uid of its own")
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        # setuid cleared "dumpable", which would hand /proc/self to root; this uid is ours alone
        _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        if _FILTER is None:
            raise _FILTER_ERROR
        sandbox_seccomp.install(_libc, _FILTER)
    except OSError as e:
        if cfg["strict"]:
            raise SetupError(f"seccomp: {e}") from e


def main(cfg: dict) -> None:
    """Supervisor; returns only in the ``user`` process, inside the jail."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != cfg["caller_pid"]:  # the caller died before the prctl
        os._exit(1)
    status_fd = cfg["status_fd"]
    with os.fdopen(0, "rb", closefd=False) as f:
        code = f.read()
    uid = cfg["uid_base"] + os.getpid()
    flags, missing = 0, []
    for name, flag in NAMESPACES.items():
        flags |= flag
    try:
        os.unshare(flags)
    except OSError:
        flags = 0
        for name, flag in NAMESPACES.items():
            try:
                os.unshare(flag)
                flags |= flag
            except OSError as e:
                missing.append(f"{name} ({e.strerror})")
        if missing and cfg["strict"]:
            _status(status_fd, {"setup_error": "namespaces unavailable: " + ", ".join(missing)})
            os._exit(1)
    _status(status_fd, {"isolation": {"namespaces": [n for n, f in NAMESPACES.items()
                                                      if flags & f],
                                      "namespaces_missing": missing}})
    alive_r, alive_w = os.pipe()
    child = 0

    def on_term(signum, frame):
        if child:
            os.kill(child, signal.SIGKILL)
        else:
            os._exit(1)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, on_term)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.close(alive_w)
        _init(cfg, uid, code, alive_r)  # returns only in the program's process
        try:
            _drop_privileges(cfg, uid)
            os.chdir(cfg["workdir"])
        except (OSError, SetupError) as e:
            _status(status_fd, {"setup_error": f"dropping privileges: {e}"})
            os._exit(125)
        os.close(status_fd)
        return
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(alive_r)
    os.close(0)
    while True:
        pid, _ = os.waitpid(child, 0)
        if pid == child:
            os._exit(0)


def _exit_code(exc: SystemExit) -> int:
    """The status ``python main.py`` would exit with after ``SystemExit(exc.code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    try:
        print(exc.code, file=sys.stderr)
    except Exception:  # noqa: BLE001 - an unprintable exit message
        pass
    return 1


def run_program() -> None:
    """Run ``main.py`` as ``__main__`` and end the process as the interpreter would (exit code,
    traceback, non-daemon threads joined, ``atexit``, flushed streams), minus the module
    teardown, which only costs time in a process that is about to vanish."""
    import site

    site.main()  # the venv's packages, now that the jail is built
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    import atexit
    import builtins
    import types

    module = types.ModuleType("__main__")  # what ``python main.py`` runs the file as
    module.__file__, module.__builtins__ = "main.py", builtins
    sys.modules["__main__"] = module
    try:
        with open("main.py", "rb") as f:
            source = f.read()
        exec(compile(source, "main.py", "exec"), module.__dict__)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - reported like the interpreter's top level
        etype, exc, tb = sys.exc_info()
        while tb is not None and tb.tb_frame.f_code.co_filename != "main.py":
            tb = tb.tb_next  # the traceback starts at the program, not in this file
        sys.excepthook(etype, exc.with_traceback(tb), tb)
        code = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001
        sys.excepthook(*sys.exc_info())
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream
            pass
    os._exit(code)


if __name__ == "__main__":
    main(marshal.loads(bytes.fromhex(sys.argv[1])))
    run_program()  # only the sandboxed program's process gets here: in the jail, unprivileged
