#!/usr/bin/env bash
# Developer set-up and entry points. Works on a fresh Debian/Raspberry Pi OS
# machine that has only python3, run as root or by a user with sudo.
#
#   bash deploy/dev.sh demo    simulated vehicle + gateway + live view (Ctrl-C to stop)
#   bash deploy/dev.sh test    lint, type-check, the whole test suite, then the HIL suite
#   bash deploy/dev.sh hil     the HIL suite alone (real SocketCAN vcan0; User-Mode
#                              Linux where the kernel has no CAN); args go to it
#   bash deploy/dev.sh bench   run the benchmarks under bench/
#
# Everything Python goes into .venv/ beside this repository's pyproject.toml,
# pinned by deploy/constraints.txt. System packages are installed only when
# missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="$here/.venv"
python="${PYTHON:-python3}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else echo "dev.sh: need root to run: $*" >&2; return 1; fi
}

apt_ensure() {
  # apt_ensure PACKAGE... : install the Debian packages that are not installed yet.
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: please install: ${missing[*]}" >&2; return 1
  fi
  echo "dev.sh: installing ${missing[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c "import venv, ensurepip" >/dev/null 2>&1; then
      apt_ensure python3-venv
    fi
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ deploy/constraints.txt -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -c deploy/constraints.txt -e ".[test,hil]"
    touch "$stamp"
  fi
}

ensure_mosquitto() {
  # The tests and the demo start their own broker from this binary; the
  # distribution's service is not needed and is not started.
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] && return 0
  apt_ensure mosquitto || {
    echo "dev.sh: mosquitto is missing: install it with 'apt-get install mosquitto'" >&2
    return 1
  }
}

ensure_hil() {
  # The HIL suite needs a real SocketCAN vcan0 and can-utils. Where the kernel has no
  # CAN (these development and CI machines), it boots User-Mode Linux, a real kernel
  # with vcan that runs as an ordinary process (hil/uml.py).
  apt_ensure can-utils
  [ -e /sys/class/net/vcan0 ] && return 0
  # modinfo lives in sbin, which a normal user's PATH lacks.
  if PATH="$PATH:/usr/sbin:/sbin" modinfo vcan >/dev/null 2>&1; then
    # A kernel with SocketCAN (a Pi, a laptop): use a real vcan0 right here.
    as_root modprobe vcan && as_root ip link add dev vcan0 type vcan &&
      as_root ip link set vcan0 up && return 0
  fi
  if [ "$(dpkg --print-architecture 2>/dev/null)" != amd64 ]; then
    echo "dev.sh: no vcan0 and no vcan module; User-Mode Linux exists only for amd64:" \
      "create vcan0 (docs/hil.md)" >&2
    return 1
  fi
  apt_ensure user-mode-linux kmod iproute2
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    ensure_mosquitto
    ensure_venv
    exec "$venv/bin/python" -m hil demo "$@"
    ;;
  test)
    ensure_mosquitto
    # systemd-analyze verifies the service unit, openssl issues the fleet broker's test
    # certificates, shellcheck checks the installer and the certificate scripts.
    apt_ensure systemd openssl shellcheck
    ensure_venv
    shellcheck deploy/*.sh deploy/broker/*.sh
    "$venv/bin/ruff" check gateway hil tests bench
    "$venv/bin/mypy"
    # The safety package must stay fully branch-covered (see [tool.coverage] in pyproject.toml).
    status=0
    "$venv/bin/python" -m pytest --cov --cov-report=term-missing:skip-covered \
        --cov-fail-under=100 "$@" || status=$?
    if [ $# -eq 0 ]; then
      # The HIL suite: every scenario end to end on real vcan, and the can-utils checks.
      { ensure_hil && "$venv/bin/python" -m hil suite; } || status=$?
    fi
    exit "$status"
    ;;
  hil)
    ensure_mosquitto
    ensure_hil
    ensure_venv
    exec "$venv/bin/python" -m hil suite "$@"
    ;;
  bench)
    ensure_mosquitto
    ensure_venv
    for b in bench/bench_*.py; do "$venv/bin/python" "$b" "$@"; done
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
