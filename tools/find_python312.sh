#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter: $PYTHON, python3.12 on PATH, then pyenv's
# versions. Exit 1 with a message naming what to install when there is none.
set -u
is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
for cand in "${PYTHON:-}" python3.12 python3 python; do
    [ -n "$cand" ] || continue
    path=$(command -v "$cand" 2>/dev/null) || continue
    if is_312 "$path"; then echo "$path"; exit 0; fi
done
for path in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python /root/.pyenv/versions/3.12*/bin/python; do
    if [ -x "$path" ] && is_312 "$path"; then echo "$path"; exit 0; fi
done
cat >&2 <<'MSG'
error: megatron_a1 needs Python 3.12 (megatron-core 0.19 requires it) and none was found.
Install it, e.g. `pyenv install 3.12` or your distribution's python3.12 + python3.12-venv,
or point PYTHON=/path/to/python3.12 at one, then run make again.
MSG
exit 1
