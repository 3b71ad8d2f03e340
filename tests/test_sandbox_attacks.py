"""Hostile programs run as real code through the sandbox: each is contained, the caller is
untouched, and nothing of the sandbox survives the call (process, mount, directory, cgroup).

The attacks: those that escaped the first sandbox (killing the caller, grandchildren that
outlive it or hold its pipes, setns/unshare, ptrace/kill of other processes, the caller's
/proc entries and secrets, writing the host's files, filling the disk), those it already
contained, and the usual items of the nsjail / bubblewrap / gVisor hardening lists.
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_a1.envs.sandbox import Limits, run_code
from megatron_a1.envs.sandbox_seccomp import DENIED

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

SECRET = "a1-trainer-secret-5be1c0de"
NR = {name: nrs[0 if os.uname().machine == "x86_64" else 1] for name, nrs in DENIED.items()}


@pytest.fixture(autouse=True)
def _secret_in_caller_env(monkeypatch):
    monkeypatch.setenv("A1_TRAINER_TOKEN", SECRET)


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(ln.split()[3:5]) for ln in f)


def _sandbox_processes(res) -> list[int]:
    """Live processes of this run: its uid, or its supervisor/init (tag on the command line)."""
    uid, tag, out = res.isolation.get("uid"), res.isolation.get("tag"), []
    for p in psutil.process_iter(["uids", "cmdline"]):
        try:
            if (uid is not None and p.info["uids"].real == uid) or \
                    (tag and any(tag in a for a in p.info["cmdline"] or ())):
                out.append(p.pid)
        except (psutil.Error, TypeError):
            pass
    return out


def _leftover_dirs() -> list[str]:
    return (glob.glob("/tmp/a1-sandbox-*") + glob.glob("/sys/fs/cgroup/*/a1-sandbox-*")
            + glob.glob("/sys/fs/cgroup/a1-sandbox-*"))


def run_contained(code: str, **limits):
    """Run ``code``; assert the caller survived and nothing of the sandbox is left."""
    before_mounts, before_dirs = _mounts(), _leftover_dirs()
    lim = Limits(**{"timeout_s": 20.0, **limits})  # generous: CI machines may be busy
    t0 = time.monotonic()
    res = run_code(textwrap.dedent(code), lim)
    took = time.monotonic() - t0
    assert took <= lim.timeout_s + 1.0, f"returned after {took:.2f}s (timeout {lim.timeout_s})"
    assert res.isolation.get("filesystem") == "private_root" and res.isolation["uid"] >= 1 << 30
    assert psutil.Process().is_running()
    left = _sandbox_processes(res)
    for _ in range(20):  # the kernel may still be tearing the namespace down
        if not left:
            break
        time.sleep(0.05)
        left = _sandbox_processes(res)
    assert left == [], f"sandbox processes left: {left}"
    assert _mounts() == before_mounts
    assert _leftover_dirs() == before_dirs
    return res


def lines(res) -> dict[str, str]:
    """``key: value`` lines the attack printed."""
    return dict(ln.split(": ", 1) for ln in res.stdout.splitlines() if ": " in ln)


# ---- the escapes of the first sandbox ------------------------------------------------------

def test_kill_parent_and_caller():
    res = run_contained(f"""
        import os, signal
        print("ppid:", os.getppid())
        for target in (os.getppid(), 1, {os.getpid()}, -1):
            try:
                os.kill(target, signal.SIGKILL)
                print(target, "sent")
            except OSError as e:
                print(str(target) + ":", type(e).__name__)
        print("alive: yes")
    """)
    out = lines(res)
    assert out["ppid"] == "1"  # its parent is the namespace's init, not the caller
    assert out["1"] == "PermissionError"  # other uid
    assert out[str(os.getpid())] == "ProcessLookupError"  # the caller is not in its namespace
    assert out["alive"] == "yes" and res.reason == "ok"


def test_grandchild_escapes_cgroup_and_setsid():
    res = run_contained("""
        import os, subprocess, sys, time
        pid = os.fork()
        if pid == 0:
            os.setsid()
            for procs in ("/sys/fs/cgroup/pids/cgroup.procs", "/sys/fs/cgroup/cgroup.procs"):
                try:
                    open(procs, "w").write(str(os.getpid()))
                    print("cgroup-escape: yes", flush=True)
                except OSError as e:
                    print("cgroup-escape:", type(e).__name__, flush=True)
            time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
        print("main: done")
    """)
    assert lines(res)["cgroup-escape"] == "FileNotFoundError"  # no /sys in the jail
    assert res.reason == "ok" and not res.timed_out  # the 60 s grandchild did not hold it


@pytest.mark.parametrize("main_waits", [False, True])
def test_grandchild_holding_stdout(main_waits):
    """A grandchild keeps stdout/stderr open and sleeps: the call still ends on time."""
    res = run_contained(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; print('gc', flush=True); "
                          "time.sleep(600)"])
        time.sleep(0.3)
        print("main: exiting", flush=True)
        if {main_waits}:
            time.sleep(600)
    """, timeout_s=1.5 if main_waits else 20.0)
    if main_waits:  # run_contained checked the return within timeout + 1 s
        assert res.timed_out and res.reason == "wall_timeout"
    else:  # returns when the program's process ends, not when the grandchild lets go
        assert res.reason == "ok" and not res.timed_out
    assert "main: exiting" in res.stdout and "gc" in res.stdout


def test_sleep_forever_with_ignored_signals():
    res = run_contained("""
        import os, signal, time
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()
        while True:
            time.sleep(1)
    """, timeout_s=1.0)
    assert res.timed_out and res.reason == "wall_timeout" and res.wall_s <= 2.0


def test_setns_into_parent_network_and_unshare():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    res = run_contained(f"""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in (1, os.getpid(), {os.getpid()}, {os.getppid()}):
            try:
                fd = os.open(f"/proc/{{pid}}/ns/net", os.O_RDONLY)
            except OSError as e:
                print(f"open-{{pid}}:", type(e).__name__)
                continue
            r = libc.setns(fd, 0)
            print(f"setns-{{pid}}:", r, ctypes.get_errno())
        for name, flags in (("ns-uts", os.CLONE_NEWNS | os.CLONE_NEWUTS),
                            ("user", os.CLONE_NEWUSER), ("net", os.CLONE_NEWNET)):
            try:
                os.unshare(flags)
                print(f"unshare-{{name}}: ok")
            except OSError as e:
                print(f"unshare-{{name}}:", e.errno)
        r = libc.syscall({NR['unshare']}, os.CLONE_NEWNS)
        print("raw-unshare:", r, ctypes.get_errno())
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            print("connect: ok")
        except OSError as e:
            print("connect:", type(e).__name__)
    """)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    out = lines(res)
    for pid in (1, "2"):  # its own namespace files: setns is denied by seccomp (EPERM=1)
        key = f"setns-{pid}"
        assert out.get(key) == "-1 1" or out.get(f"open-{pid}") == "PermissionError", out
    assert out[f"open-{os.getpid()}"] == "FileNotFoundError"  # the caller is invisible
    assert all(out[f"unshare-{n}"] == "1" for n in ("ns-uts", "user", "net"))
    assert out["raw-unshare"] == "-1 1"
    assert out["connect"] in ("OSError", "ConnectionRefusedError")


def test_ptrace_and_process_vm_of_others():
    res = run_contained(f"""
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
        for pid in (1, child, {os.getpid()}):
            r = libc.syscall({NR['ptrace']}, 16, pid, 0, 0)  # PTRACE_ATTACH
            print(f"ptrace-{{pid}}:", r, ctypes.get_errno())
        r = libc.syscall({NR['process_vm_readv']}, 1, 0, 0, 0, 0, 0)
        print("vm_readv:", r, ctypes.get_errno())
        os.kill(child, 9)
    """)
    out = lines(res)
    assert all(v == "-1 1" for k, v in out.items() if k.startswith("ptrace-")), out
    assert out["vm_readv"] == "-1 1"


def test_caller_environment_and_proc_entries_are_out_of_reach():
    res = run_contained(f"""
        import os
        print("env:", sorted(os.environ))
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if b"{SECRET}" in open(f"/proc/{{pid}}/environ", "rb").read():
                        found.append(pid)
                except OSError:
                    pass
        print("found:", found)
        print("pids:", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        for pid in (1, {os.getpid()}):
            try:
                open(f"/proc/{{pid}}/environ", "rb").read()
                print(f"environ-{{pid}}: read")
            except OSError as e:
                print(f"environ-{{pid}}:", type(e).__name__)
    """)
    out = lines(res)
    assert SECRET not in res.stdout + res.stderr and out["found"] == "[]"
    assert "A1_TRAINER_TOKEN" not in out["env"]
    assert out["pids"] == "[1, 2]"  # only the namespace's init and the program itself
    assert out["environ-1"] == "PermissionError"
    assert out[f"environ-{os.getpid()}"] == "FileNotFoundError"


def test_secrets_and_host_files_are_unreadable():
    res = run_contained("""
        import os
        for path in ("/etc/shadow", "/etc/gshadow", "/root/.bashrc", "/root/.ssh",
                     "/work/main/setup.py", "/home"):
            try:
                open(path).read() if not os.path.isdir(path) else os.listdir(path)
                print(path + ":", "read")
            except OSError as e:
                print(path + ":", type(e).__name__)
    """)
    out = lines(res)
    assert out["/etc/shadow"] == "PermissionError" and out["/etc/gshadow"] == "PermissionError"
    # the caller's files do not exist in the jail (only the read-only Python installation)
    for path in ("/root/.bashrc", "/root/.ssh", "/work/main/setup.py", "/home"):
        assert out[path] == "FileNotFoundError"
    assert "read" not in out.values()


def test_bundled_answers_are_hidden_but_checkers_import():
    """The package's code is readable (trusted checkers import it); its data is not."""
    import megatron_a1.envs as envs

    tasks = os.path.join(os.path.dirname(envs.__file__), "tasks")
    assert os.path.exists(os.path.join(tasks, "science.jsonl"))
    res = run_contained(f"""
        import os
        print("tasks:", os.listdir("{tasks}"))
        from megatron_a1.envs.science import _check
        print("checker:", _check("2*x", "x+x", "symbolic", 1e-4, 0))
    """)
    assert lines(res) == {"tasks": "[]", "checker": "True"}, res.stderr


def test_host_files_cannot_be_written_or_deleted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    res = run_contained(f"""
        import os, shutil
        targets = ["{victim}", "/etc/passwd", "/usr/bin/python3", "/etc/new-file", "/usr/new",
                   "/new-at-root", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger",
                   "/dev/sda", "/sandbox/../etc/x"]
        for t in targets:
            try:
                with open(t, "a") as f:
                    f.write("x")
                print(t + ":", "written")
            except OSError as e:
                print(t + ":", type(e).__name__)
        for t in ("{victim}", "/etc/hostname", "/usr/lib"):
            try:
                (shutil.rmtree if os.path.isdir(t) else os.remove)(t)
                print("rm " + t + ":", "removed")
            except OSError as e:
                print("rm " + t + ":", type(e).__name__)
        open("ok.txt", "w").write("fine")
        print("own-dir:", open("ok.txt").read())
    """)
    out = lines(res)
    assert victim.read_text() == "keep me"
    assert "written" not in out.values() and "removed" not in out.values(), out
    assert out["own-dir"] == "fine"


def test_fill_the_disk():
    res = run_contained("""
        import os
        total = 0
        try:
            for i in range(100):
                for d in (".", "/tmp", "/dev/shm"):
                    with open(f"{d}/fill{i}", "wb") as f:
                        f.write(b"x" * (2 << 20))
                    total += 2 << 20
        except OSError as e:
            print("stopped:", e.errno)
        print("written-mb:", total >> 20)
    """, disk_mb=16)
    out = lines(res)
    assert out["stopped"] == "28"  # ENOSPC: one 16 MiB tmpfs behind the three directories
    assert int(out["written-mb"]) <= 16


def test_big_single_file_is_refused():
    res = run_contained("""
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (3 << 20))
        except OSError as e:
            print("stopped:", e.errno)
    """, max_file_bytes=1 << 20)
    assert lines(res)["stopped"] == "27"  # EFBIG (RLIMIT_FSIZE)


# ---- what the first sandbox already contained ---------------------------------------------

def test_network_loopback_dns_udp():
    res = run_contained("""
        import socket
        for name, fn in (
                ("tcp", lambda: socket.create_connection(("127.0.0.1", 22), timeout=1)),
                ("dns", lambda: socket.getaddrinfo("pypi.org", 443)),
                ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                    b"x", ("8.8.8.8", 53)))):
            try:
                fn()
                print(name + ":", "ok")
            except OSError as e:
                print(name + ":", type(e).__name__)
        print("ifaces:", [n for _, n in socket.if_nameindex()])
    """)
    out = lines(res)
    assert "ok" not in (out["tcp"], out["dns"], out["udp"])
    assert out["ifaces"] == "['lo']"


@pytest.mark.parametrize("bomb", ["fork", "thread"])
def test_fork_and_thread_bombs(bomb):
    code = {"fork": """
        import os, time
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print("made:", n, flush=True)
    """, "thread": """
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
                n += 1
        except RuntimeError:
            pass
        print("made:", n, flush=True)
    """}[bomb]
    res = run_contained(code, max_processes=12)  # the sleeping bomb dies with the program
    assert 0 < int(lines(res)["made"]) < 12
    assert res.reason == "ok"


@pytest.mark.parametrize("kind", ["bytearray", "numpy"])
def test_memory_bombs(kind):
    grow = "a.append(bytearray(10**7))" if kind == "bytearray" else \
        "a.append(numpy.ones(10**7 // 8))"
    res = run_contained(f"""
        import numpy
        a = []
        while True:
            {grow}
    """, memory_mb=300)
    assert res.reason == "memory" and "MemoryError" in res.stderr


def test_raising_limits_and_privileges():
    res = run_contained("""
        import os, resource
        for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE"):
            lim = getattr(resource, name)
            try:
                resource.setrlimit(lim, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print(name + ":", "raised")
            except (ValueError, OSError) as e:
                print(name + ":", type(e).__name__)
        for name, fn in (("setuid", lambda: os.setuid(0)), ("setgid", lambda: os.setgid(0)),
                         ("chroot", lambda: os.chroot("/tmp")),
                         ("mknod", lambda: os.mknod("/tmp/d", 0o600 | 0o60000, os.makedev(8, 0))),
                         ("hostname", lambda: __import__("socket").sethostname("pwned"))):
            try:
                fn()
                print(name + ":", "ok")
            except OSError as e:
                print(name + ":", e.errno)
        print("status:", [ln for ln in open("/proc/self/status")
                          if ln.startswith(("CapEff", "NoNewPrivs", "Seccomp:"))])
    """)
    out = lines(res)
    assert "raised" not in out.values() and "ok" not in out.values(), out
    assert "CapEff:\\t0000000000000000" in out["status"]
    assert "NoNewPrivs:\\t1" in out["status"] and "Seccomp:\\t2" in out["status"]
    assert socket.gethostname() != "pwned"


def test_infinite_recursion_and_cpu_loop():
    res = run_contained("import sys\nsys.setrecursionlimit(10**6)\ndef f(): f()\nf()",
                        memory_mb=256)
    assert res.returncode != 0 and not res.timed_out
    res = run_contained("while True:\n    pass", cpu_s=1)
    assert res.reason == "cpu_timeout" and res.timed_out


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output(stream):
    res = run_contained(f"import sys\nwhile True:\n    sys.{stream}.write('y' * 4096)",
                        max_output_bytes=10000)
    assert res.reason == "output_limit" and res.output_truncated
    assert getattr(res, stream) == "y" * 10000 and not res.timed_out


# ---- hardening-guide items ------------------------------------------------------------------

def test_denied_syscalls():
    names = ["mount", "umount2", "pivot_root", "bpf", "keyctl", "add_key", "perf_event_open",
             "userfaultfd", "io_uring_setup", "init_module", "kexec_load", "open_by_handle_at",
             "swapon", "reboot", "syslog", "acct", "fsopen", "open_tree", "mount_setattr",
             "kcmp", "personality"]
    calls = "\n".join(f"        print('{n}:', libc.syscall({NR[n]}, 0, 0, 0, 0, 0), "
                      f"ctypes.get_errno())" for n in names)
    res = run_contained(f"""
        import ctypes, fcntl, termios, os
        libc = ctypes.CDLL(None, use_errno=True)
{calls}
        CLONE_NEWUSER = 0x10000000
        print("clone-newuser:", libc.syscall({56 if os.uname().machine == "x86_64" else 220},
                                             CLONE_NEWUSER | 17, 0, 0, 0, 0), ctypes.get_errno())
        print("clone3:", libc.syscall(435, 0, 0), ctypes.get_errno())
        try:
            fcntl.ioctl(0, termios.TIOCSTI, b"x")
        except OSError as e:
            print("tiocsti:", e.errno)
        try:
            import subprocess
            r = subprocess.run(["unshare", "-r", "true"], capture_output=True)
            print("unshare-cli:", r.returncode)
        except OSError as e:
            print("unshare-cli:", type(e).__name__)
    """)
    out = lines(res)
    for n in names:
        assert out[n] == "-1 1", (n, out[n])
    assert out["clone-newuser"] == "-1 1" and out["clone3"] == "-1 38"
    assert out["tiocsti"] == "1" and out["unshare-cli"] != "0"


def test_symlink_and_proc_root_tricks():
    res = run_contained("""
        import os
        os.symlink("/etc/shadow", "shadow-link")
        os.symlink("/proc/1/root/etc/shadow", "init-root-link")
        for p in ("shadow-link", "init-root-link", "/proc/1/root/etc/hostname", "/proc/1/cwd",
                  "/proc/self/root/../../etc/shadow"):
            try:
                open(p).read() if not os.path.isdir(p) else os.listdir(p)
                print(p + ":", "read")
            except OSError as e:
                print(p + ":", type(e).__name__)
        try:
            os.link("/etc/shadow", "hard")
            print("hardlink:", "ok")
        except OSError as e:
            print("hardlink:", type(e).__name__)
        print("root:", sorted(os.listdir("/")))
    """)
    out = lines(res)
    assert "read" not in out.values() and out["hardlink"] != "ok", out
    assert "home" not in out["root"] and "var" not in out["root"]


def test_suid_binaries_gain_nothing():
    res = run_contained("""
        import subprocess
        for cmd in (["mount", "-t", "tmpfs", "x", "/tmp"], ["su", "-c", "id"], ["id", "-u"]):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=3)
                print(cmd[0] + ":", r.returncode, r.stdout.strip())
            except OSError as e:
                print(cmd[0] + ":", type(e).__name__)
    """)
    out = lines(res)
    assert not out["mount"].startswith("0")
    assert not out["su"].startswith("0 ")
    assert out["id"].split()[-1] != "0"


def test_signals_to_init_and_siblings_stay_inside():
    res = run_contained("""
        import os, signal
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
            try:
                os.kill(1, sig)
                print(f"init-{sig.name}:", "sent")
            except OSError as e:
                print(f"init-{sig.name}:", type(e).__name__)
        print("still-running: yes")
    """)
    out = lines(res)
    assert out["init-SIGKILL"] == "PermissionError" and out["still-running"] == "yes"
    assert res.reason == "ok"


def test_caller_killed_takes_the_sandbox_down(tmp_path):
    marker = f"a1-orphan-marker-{os.getpid()}"
    caller = tmp_path / "caller.py"
    caller.write_text(textwrap.dedent(f"""
        from megatron_a1.envs.sandbox import Limits, run_code
        run_code('''
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
        time.sleep(120)
        ''', Limits(timeout_s=120))
    """))
    proc = subprocess.Popen([sys.executable, str(caller)], cwd=os.getcwd())

    def marked():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if marker in (p.info["cmdline"] or ()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + 30
    while not marked():
        assert time.monotonic() < deadline and proc.poll() is None, "sandbox never started"
        time.sleep(0.05)
    victims = marked()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(victims, timeout=3)
    assert alive == [], "the sandboxed program outlived its caller"
    assert _leftover_dirs() == []
