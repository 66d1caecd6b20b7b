#!/usr/bin/env bash
# Sets up (or reuses) the Python environment that the Makefile's commands run in.
#
# - Uses the active virtual environment if there is one ($VIRTUAL_ENV), else creates ./.venv.
# - Keeps any torch already installed there (on a GPU machine, the user's CUDA build). With no
#   torch, installs torch==2.13.0: on CPU-only machines here that is the CPU wheel lying on
#   disk; an unpinned torch would pull a multi-GB CUDA build.
# - Installs mtkit itself (editable) with the extras named in $MTKIT_EXTRAS (default: dev),
#   skipping the install when pyproject.toml and the version have not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    venv=$VIRTUAL_ENV
else
    venv=.venv
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating virtual environment $venv" >&2
        python3 -m venv "$venv"
    fi
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0" >&2
    "${pip[@]}" install "torch==2.13.0"
fi

extras=${MTKIT_EXTRAS:-dev}
stamp="$venv/.mtkit-installed-${extras//,/-}"
want="$(cat pyproject.toml mtkit/__init__.py | sha256sum | cut -c1-16) $extras $(pwd)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$py" -c "import mtkit" 2>/dev/null; then
    echo "setup: installing mtkit[$extras] into $venv" >&2
    "${pip[@]}" install -e ".[$extras]"
    echo "$want" > "$stamp"
fi
echo "$venv"
