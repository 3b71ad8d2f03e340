"""The sandbox's seccomp filter: a classic-BPF program installed with ``prctl(PR_SET_SECCOMP)``.

Standard library only (``ctypes``): the sandbox's jail script imports this module by path before
any site-packages exist, and PyPI has no maintained libseccomp binding (``pyseccomp`` is from 2021,
the Debian ``python3-seccomp`` is for the system Python only).

What the filter does (x86_64 and aarch64; any other architecture of syscall is killed):

* returns ``EPERM`` for the calls that leave or rebuild the sandbox, or reach the kernel's
  debugging/admin surface: ``setns``, ``unshare``, ``ptrace``, ``process_vm_readv/writev``,
  ``kcmp``, ``mount`` and the new mount API (``fsopen`` … ``mount_setattr``), ``umount2``,
  ``pivot_root``, ``chroot``, ``bpf``, ``perf_event_open``, ``keyctl``/``add_key``/
  ``request_key``, ``userfaultfd``, ``io_uring_*`` (whose operations bypass seccomp), module and
  kexec loading, ``open_by_handle_at``/``name_to_handle_at``, ``swapon/off``, ``reboot``,
  ``syslog``, ``acct``, ``quotactl``, ``personality``, clock setting, ``vhangup`` and, on
  x86_64, ``iopl``/``ioperm`` and every x32-ABI call;
* ``clone`` with any ``CLONE_NEW*`` flag: ``EPERM`` (plain ``fork`` and threads pass);
* ``clone3``: ``ENOSYS`` (its flags sit behind a pointer BPF cannot read; the C library then
  falls back to ``clone``, which is checked);
* ``ioctl(fd, TIOCSTI)``/``TIOCLINUX``: ``EPERM`` (typing into a terminal);
* everything else is allowed.

Signals need no rule: the sandboxed process lives in its own PID namespace, so every process
outside it is invisible to ``kill``/``tgkill``/``pidfd_open``, and it runs under a uid of its
own, so it cannot signal the namespace's init either.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = ["DENIED", "build_filter", "install"]

# (x86_64, aarch64) syscall numbers; None where the call does not exist on that architecture.
DENIED: dict[str, tuple[int | None, int | None]] = {
    "setns": (308, 268), "unshare": (272, 97), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "bpf": (321, 280), "perf_event_open": (298, 241),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116), "acct": (163, 89),
    "quotactl": (179, 60), "personality": (135, 92), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
    "vhangup": (153, 58), "iopl": (172, None), "ioperm": (173, None), "uselib": (134, None),
    "lookup_dcookie": (212, 18),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_IOCTL = (16, 29)
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME is
# clone3/unshare only: in clone's flags its bit is part of the exit signal)
_CLONE_NS_MASK = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_X32_BIT = 0x40000000

# classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K, _JGE_K, _JSET_K = 0x15, 0x35, 0x45
_RET_K = 0x06
_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_RET_ERRNO = 0x00050000
# offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]} (little-endian)
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


def build_filter(machine: str | None = None) -> bytes:
    """The filter as packed ``struct sock_filter`` instructions (8 bytes each)."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise OSError(f"no seccomp filter for architecture {machine!r} (x86_64, aarch64 only)")
    col, audit_arch = _ARCHES[machine]
    denied = sorted({nrs[col] for nrs in DENIED.values() if nrs[col] is not None})
    # program with symbolic jump targets, resolved below
    prog: list[tuple] = [
        ("ld", _OFF_ARCH), ("jeq", audit_arch, None, "kill"), ("ld", _OFF_NR)]
    if machine == "x86_64":
        prog.append(("jge", _X32_BIT, "eperm", None))
    prog += [("jeq", nr, "eperm", None) for nr in denied]
    prog += [("jeq", _CLONE3[col], "enosys", None), ("jeq", _CLONE[col], "clone", None),
             ("jeq", _IOCTL[col], "ioctl", None), ("ret", _RET_ALLOW)]
    prog += [("label", "clone"), ("ld", _arg_lo(0)), ("jset", _CLONE_NS_MASK, "eperm", None),
             ("ret", _RET_ALLOW)]
    prog += [("label", "ioctl"), ("ld", _arg_lo(1)), ("jeq", _TIOCSTI, "eperm", None),
             ("jeq", _TIOCLINUX, "eperm", None), ("ret", _RET_ALLOW)]
    prog += [("label", "eperm"), ("ret", _RET_ERRNO | errno.EPERM),
             ("label", "enosys"), ("ret", _RET_ERRNO | errno.ENOSYS),
             ("label", "kill"), ("ret", _RET_KILL_PROCESS)]
    labels, n = {}, 0
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = n
        else:
            n += 1
    out, pc = [], 0
    for ins in prog:
        op = ins[0]
        if op == "label":
            continue
        if op == "ld":
            out.append(struct.pack("<HBBI", _LD_W_ABS, 0, 0, ins[1]))
        elif op == "ret":
            out.append(struct.pack("<HBBI", _RET_K, 0, 0, ins[1]))
        else:
            code = {"jeq": _JEQ_K, "jge": _JGE_K, "jset": _JSET_K}[op]
            jt = 0 if ins[2] is None else labels[ins[2]] - pc - 1
            jf = 0 if ins[3] is None else labels[ins[3]] - pc - 1
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise AssertionError("seccomp filter jump out of range")
            out.append(struct.pack("<HBBI", code, jt, jf, ins[1]))
        pc += 1
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def install(libc: ctypes.CDLL | None = None, code: bytes | None = None) -> None:
    """Set ``no_new_privs`` and install the filter (``code``: :func:`build_filter`'s, built
    here when not given) on the calling thread; it is inherited by every child and kept across
    ``execve``. Raises ``OSError`` on failure."""
    libc = libc or ctypes.CDLL(None, use_errno=True)
    code = code or build_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {errno.errorcode.get(e, e)}")
    if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_SECCOMP): {errno.errorcode.get(e, e)}")
