#!/bin/sh
# Create the virtual environment and install Coffer with its development tools, and the Debian
# packages the test suite and the demo use (PostgreSQL, swtpm, tpm2-tools, skopeo, umoci, docker-registry, runc, busybox-static; gcc and
# Python's headers for the optional compiled policy views). As root, missing Debian
# packages are installed; otherwise the exact command to run is printed and the script stops.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# need PROBE PACKAGE: PROBE is a command, an absolute path, or dpkg:NAME (an installed package)
need() {
    probe=$1
    package=$2
    case "$probe" in
        /*) [ -e "$probe" ] && return 0 ;;
        dpkg:*) dpkg -s "${probe#dpkg:}" >/dev/null 2>&1 && return 0 ;;
        *) command -v "$probe" >/dev/null 2>&1 && return 0 ;;
    esac
    missing="$missing $package"
}

missing=""
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$missing python3-venv python3-pip"
fi
need /usr/lib/postgresql/15/bin/initdb postgresql
need swtpm swtpm
need swtpm_setup swtpm-tools
need tpm2_quote tpm2-tools
need dpkg:libtss2-tcti-swtpm0 libtss2-tcti-swtpm0
need skopeo skopeo
need umoci umoci
need docker-registry docker-registry
need runc runc
need /bin/busybox busybox-static
# A C compiler and Python's headers, for the optional compiled policy views (scripts/build_native.py).
need gcc gcc
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need dpkg:python3-dev python3-dev

if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian packages:$missing"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    else
        echo "bootstrap: Debian packages are missing. Run as root:" >&2
        echo "    apt-get update && apt-get install -y$missing" >&2
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
