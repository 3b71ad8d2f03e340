"""Sandbox containment: each hostile program is stopped, reported, and leaves nothing behind."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from megatron_a1.envs.sandbox import Limits, isolation_support, run_code


def _leftovers(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in a for a in (p.info["cmdline"] or [])):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_ok_program_output_and_private_dir():
    r = run_code("import os\nprint(sum(range(10)))\nopen('f.txt','w').write('x')\n"
                 "print(os.getcwd(), os.listdir('.'))", Limits(timeout_s=10))
    assert r.returncode == 0 and r.reason == "ok" and not r.timed_out
    total, rest = r.stdout.split("\n", 1)
    cwd, files = rest.split(" ", 1)
    assert total == "45"
    assert os.path.basename(cwd).startswith("a1-sandbox-")
    assert not os.path.exists(cwd)  # deleted afterwards
    assert "f.txt" in files


def test_exception_is_reported():
    r = run_code("raise ValueError('boom')")
    assert r.returncode == 1 and r.reason == "error" and "ValueError: boom" in r.stderr


def test_infinite_loop_times_out():
    r = run_code("while True:\n    pass", Limits(timeout_s=1.5))
    assert r.timed_out and r.reason in ("wall_timeout", "cpu_timeout")
    assert r.wall_s < 5


def test_sleeping_child_process_is_killed_at_wall_timeout():
    marker = "a1-sleeper-marker-7731"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
        time.sleep(60)
    """)
    r = run_code(code, Limits(timeout_s=1.5))
    assert r.reason == "wall_timeout" and r.timed_out
    assert _leftovers(marker) == []


def test_memory_bomb_is_contained():
    code = "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))"
    r = run_code(code, Limits(timeout_s=20, memory_mb=256))
    assert r.reason == "memory" and r.returncode == 1 and "MemoryError" in r.stderr


def test_huge_print_is_truncated_and_stopped():
    r = run_code("while True:\n    print('x' * 1000)", Limits(timeout_s=20, max_output_bytes=5000))
    assert r.reason == "output_limit" and r.output_truncated and not r.timed_out
    assert r.stdout == ("x" * 1000 + "\n") * 4 + "x" * 996
    assert r.wall_s < 10


def test_connection_attempt_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("CONNECTED")
        except OSError as e:
            print("refused:", type(e).__name__)
    """)
    r = run_code(code, Limits(timeout_s=10))
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever reached the listener
    server.close()
    assert "CONNECTED" not in r.stdout and r.stdout.startswith("refused:")
    assert r.isolation["network"] in ("namespace", "audit_hook")


@pytest.mark.skipif(isolation_support()["processes"] == "none",
                    reason="no process-count enforcement here (root without a pids cgroup)")
def test_fork_bomb_is_contained():
    # linear fork bomb (each child sleeps): bounded even if containment were missing
    code = textwrap.dedent("""
        import os, time
        n = 0
        for _ in range(400):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        print(n, flush=True)
        time.sleep(60)
    """)
    r = run_code(code, Limits(timeout_s=3, max_processes=12))
    assert r.timed_out and r.reason == "wall_timeout"
    assert 0 < int(r.stdout) < 12  # the 12th process could not be created
    assert r.isolation["processes"] in ("cgroup", "rlimit")
    assert psutil.Process().is_running()


def test_command_line_prints_json(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("print('hello from the sandbox')")
    out = subprocess.run([sys.executable, "-m", "megatron_a1.envs.sandbox", "--timeout", "10",
                          "--memory-mb", "512", str(f)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    res = json.loads(out.stdout)
    assert res["stdout"] == "hello from the sandbox\n" and res["returncode"] == 0
    assert res["timed_out"] is False and res["stderr"] == ""
