#!/bin/sh
# Create the virtual environment and install Coffer with its development tools.
# Debian packages this needs (none beyond Python's venv support for now) are installed when
# running as root; otherwise the command to run is printed and the script stops.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
APT_PACKAGES="python3-venv python3-pip"

missing=""
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$APT_PACKAGES"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian packages: $missing"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
    else
        echo "bootstrap: Python's venv module is missing. Run as root:" >&2
        echo "    apt-get update && apt-get install -y $missing" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing Python packages into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
