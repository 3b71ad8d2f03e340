"""Sandbox behaviour: output, errors, limits, the jail's layout, concurrency, strict mode, CLI.

Hostile programs (escapes, leftovers) are in ``test_sandbox_attacks.py``.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_a1.envs.sandbox import Limits, isolation_support, run_code
from megatron_a1.envs.sandbox_seccomp import DENIED, build_filter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")


def test_ok_program_output_and_private_dir():
    r = run_code("import json, os\nprint(sum(range(10)))\nopen('f.txt','w').write('x')\n"
                 "print(json.dumps([os.getcwd(), sorted(os.listdir('.')), os.environ['HOME']]))",
                 Limits(timeout_s=10))
    assert r.returncode == 0 and r.reason == "ok" and not r.timed_out and r.stderr == ""
    total, rest = r.stdout.split("\n", 1)
    assert total == "45"
    assert json.loads(rest) == ["/sandbox", ["f.txt", "main.py"], "/sandbox"]


def test_jail_layout_and_identity():
    r = run_code(textwrap.dedent("""
        import os, socket, sys
        print(os.getuid(), os.getgid(), os.getgroups(), os.getpid(), os.getppid())
        print(socket.gethostname(), sorted(os.listdir("/dev")))
        print(sorted({ln.split(":")[2] for ln in open("/proc/self/cgroup")}))
        import numpy, sympy  # the venv's packages are importable
        print(sys.executable == %r)
    """ % sys.executable))
    ids, dev, cgroup, exe = r.stdout.splitlines()
    uid, gid, groups, pid, ppid = ids.split()
    assert int(uid) == int(gid) == r.isolation["uid"] >= 1 << 30
    assert (groups, pid, ppid) == ("[]", "2", "1")  # the namespace's init is its parent
    assert dev == ("sandbox ['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', "
                   "'stdout', 'urandom', 'zero']")
    assert cgroup == "['/\\n']" and exe == "True"  # cgroup namespace: the root of its own
    assert r.isolation["namespaces"] == ["pid", "net", "ipc", "uts", "cgroup"]


def test_exception_is_reported_from_the_program():
    r = run_code("def f():\n    raise ValueError('boom')\nf()")
    assert r.returncode == 1 and r.reason == "error"
    assert r.stderr.startswith('Traceback (most recent call last):\n  File "main.py", line 3')
    assert r.stderr.endswith("ValueError: boom\n")
    r = run_code("import sys\nprint('a')\nsys.exit(3)")
    assert (r.returncode, r.stdout, r.reason) == (3, "a\n", "error")


def test_threads_and_atexit_finish_like_the_interpreter():
    r = run_code(textwrap.dedent("""
        import atexit, threading, time
        atexit.register(lambda: print("atexit"))
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
    """))
    assert r.stdout == "thread\natexit\n" and r.returncode == 0


def test_infinite_loop_times_out():
    r = run_code("while True:\n    pass", Limits(timeout_s=1.5))
    assert r.timed_out and r.reason in ("wall_timeout", "cpu_timeout")
    assert r.wall_s <= 1.5 + 1.0  # the timeout holds: killed and torn down within a second


def test_memory_bomb_is_contained():
    r = run_code("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))",
                 Limits(timeout_s=20, memory_mb=256))
    assert r.reason == "memory" and r.returncode == 1 and "MemoryError" in r.stderr


def test_huge_print_is_truncated_and_stopped():
    r = run_code("while True:\n    print('x' * 1000)", Limits(timeout_s=20, max_output_bytes=5000))
    assert r.reason == "output_limit" and r.output_truncated and not r.timed_out
    assert r.stdout == ("x" * 1000 + "\n") * 4 + "x" * 996


def test_disk_size_is_configurable():
    code = ("n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'x' * 2**20)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)")
    small = run_code(code, Limits(disk_mb=4))
    big = run_code(code, Limits(disk_mb=12))
    n_small, n_big = (int(r.stdout.split()[0]) for r in (small, big))
    assert small.stdout.split()[1] == "28" and 2 <= n_small <= 4 and 10 <= n_big <= 12


def test_concurrent_calls_get_their_own_uid():
    code = "import os, time\ntime.sleep(0.3)\nprint(os.getuid())"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_code(code, Limits(max_processes=2)), range(4)))
    uids = {int(r.stdout) for r in results}
    assert all(r.reason == "ok" for r in results) and len(uids) == 4
    assert uids == {r.isolation["uid"] for r in results}


def test_seccomp_filter_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = build_filter(machine)
        assert len(prog) % 8 == 0 and 40 < len(prog) // 8 < 256
    with pytest.raises(OSError, match="riscv64"):
        build_filter("riscv64")
    must = {"setns", "unshare", "ptrace", "mount", "bpf", "keyctl", "perf_event_open"}
    assert must <= set(DENIED)


def test_isolation_support_reports_everything_here():
    sup = isolation_support()
    assert sup["namespaces_missing"] == [] and sup["filesystem"] == "private_root"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_strict_mode_refuses_without_namespaces():
    """A caller without CAP_SYS_ADMIN (an unprivileged container) cannot build the jail."""
    code = textwrap.dedent("""
        from megatron_a1.envs.sandbox import Limits, SandboxUnavailable, run_code
        try:
            run_code("print(1)")
            print("RAN")
        except SandboxUnavailable as e:
            print("REFUSED", e)
        r = run_code("print(1)", Limits(strict=False))
        print("LOOSE", r.isolation["namespaces_missing"] != [], r.isolation["filesystem"])
    """)
    out = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    refused, loose = out.stdout.splitlines()
    assert refused.startswith("REFUSED sandbox could not be built: namespaces unavailable: pid")
    assert "strict=False" in refused
    assert loose.startswith("LOOSE True host")
    assert "SANDBOX RUNS WITH LESS ISOLATION" in out.stderr  # said once, loudly


def test_command_line_prints_json(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("print('hello from the sandbox')")
    out = subprocess.run([sys.executable, "-m", "megatron_a1.envs.sandbox", "--timeout", "10",
                          "--memory-mb", "512", "--disk-mb", "8", str(f)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    res = json.loads(out.stdout)
    assert res["stdout"] == "hello from the sandbox\n" and res["returncode"] == 0
    assert res["timed_out"] is False and res["stderr"] == ""
