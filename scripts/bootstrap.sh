# Sourced by ./demo.sh and ./test.sh: make .venv with lmt-edge installed, and make sure a
# mosquitto broker binary is on this machine. Safe to run again: it only does what is missing.
# shellcheck shell=bash
set -euo pipefail

LMT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$LMT_ROOT/.venv"

say() { printf '[lmt-edge setup] %s\n' "$*" >&2; }
die() { printf '[lmt-edge setup] error: %s\n' "$*" >&2; exit 1; }

run_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

find_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$py"; return 0
        fi
    done
    return 1
}

ensure_venv() {
    local py stamp want
    if [ ! -x "$VENV/bin/python" ]; then
        py=$(find_python) || die "Python 3.11 or newer is needed (on Debian: sudo apt-get install python3)"
        say "creating $VENV with $py"
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            # Debian ships venv (and ensurepip) separately: python3-venv, or python3.X-venv.
            local pkg ver
            ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            pkg=python3-venv
            if [ "$(command -v python3 || true)" != "" ] &&
                [ "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)" != "$ver" ]; then
                pkg="python$ver-venv"
            fi
            if command -v apt-get >/dev/null 2>&1; then
                say "python's venv module is missing: installing $pkg from the system packages"
                run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
                    run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null ||
                    die "python's venv module is missing: run 'sudo apt-get install $pkg'"
                "$py" -m venv "$VENV" >/dev/null 2>&1 || { rm -rf "$VENV"; die "cannot create $VENV with $py"; }
            else
                die "python's venv module is missing: install it for $py"
            fi
        fi
    fi
    stamp="$VENV/.lmt-installed"
    want=$(cat "$LMT_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        say "installing lmt-edge and its dependencies into .venv (first run takes a few minutes)"
        local log="$VENV/install.log"
        if ! { "$VENV/bin/python" -m pip install --upgrade pip "setuptools>=69" wheel &&
               "$VENV/bin/python" -m pip install -e "$LMT_ROOT[test]"; } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            die "installing the Python packages failed (full log: $log)"
        fi
        # Compile the control kernels into numba's on-disk cache, so starts are warm.
        "$VENV/bin/lmt" warmup >>"$log" 2>&1 || say "warning: lmt warmup failed (see $log)"
        echo "$want" > "$stamp"
    fi
}

find_mosquitto() {
    command -v mosquitto 2>/dev/null && return 0
    local p
    for p in /usr/sbin/mosquitto /usr/local/sbin/mosquitto /opt/homebrew/sbin/mosquitto; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

ensure_mosquitto() {
    if LMT_MOSQUITTO=$(find_mosquitto); then export LMT_MOSQUITTO; return 0; fi
    if command -v apt-get >/dev/null 2>&1; then
        say "mosquitto is missing: installing it from the system packages"
        if run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; then
            # Debian starts the system broker on port 1883; lmt-edge's demo and tests run their own.
            LMT_MOSQUITTO=$(find_mosquitto) && { export LMT_MOSQUITTO; return 0; }
        fi
        die "mosquitto is missing and could not be installed here: run 'sudo apt-get install mosquitto'"
    fi
    die "mosquitto is missing: install the mosquitto broker with your system's package manager"
}

ensure_venv
ensure_mosquitto
export PATH="$VENV/bin:$PATH"
