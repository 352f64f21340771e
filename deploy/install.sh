#!/usr/bin/env bash
# Install ev-gateway as a systemd service on Raspberry Pi OS / Debian bookworm
# (docs/deploy.md). Run as root from a checkout of this repository:
#
#   deploy/install.sh [--root DIR] [--from PATH] [--no-deps] [--can BITRATE] [--vcan]
#   deploy/install.sh [--root DIR] --uninstall [--purge]
#
#   --root DIR     install into DIR instead of / (an image being built, or a
#                  test); systemctl is then not called
#   --from PATH    the ev-gateway to install: a wheel or a source tree
#                  (default: this checkout)
#   --no-deps      install only ev-gateway into the venv, keeping the
#                  dependencies already there (a quick upgrade of the code)
#   --can BITRATE  bring can0 up at BITRATE with systemd-networkd
#   --vcan         create vcan0 with systemd-networkd (bench setups)
#   --uninstall    remove the venv, the unit and the networkd files; keep
#                  /etc/ev-gateway and /var/lib/ev-gateway ...
#   --purge        ... and remove those too
#
# Running it again upgrades the code and changes nothing else: an existing
# gateway.toml, keys or state are never touched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
user=ev-gateway

say() { echo "install.sh: $*" >&2; }
die() { say "$*"; exit 1; }
usage() { sed -n '4,18{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2; exit "${1:-2}"; }

root=/ from="$here" no_deps=0 can_bitrate="" vcan=0 uninstall=0 purge=0 fresh_config=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || usage; root="$2"; shift ;;
    --from) [ $# -ge 2 ] || usage; from="$2"; shift ;;
    --no-deps) no_deps=1 ;;
    --can) [ $# -ge 2 ] || usage; can_bitrate="$2"; shift ;;
    --vcan) vcan=1 ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h|--help) usage 0 ;;
    *) say "unknown argument: $1"; usage ;;
  esac
  shift
done
[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || die "--purge goes with --uninstall"
if [ -n "$can_bitrate" ] && ! [[ "$can_bitrate" =~ ^[1-9][0-9]{3,6}$ ]]; then
  die "--can wants a bitrate in bit/s, e.g. 500000 (the profile's [[bus]] bitrate)"
fi

mkdir -p "$root"
# R prefixes every target path: empty for the running system, so "$R/etc" is /etc.
R="$(cd "$root" && pwd)"
R="${R%/}"
if [ -e "$from" ]; then from="$(realpath "$from")"; fi
# Python puts the working directory on sys.path: run from the checkout, pip
# and the version check would see the checkout's ev-gateway, not the venv's.
cd /
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [ -z "$R" ] && [ "$(id -u)" -ne 0 ]; then die "run as root to install into /"; fi
# systemctl is only meaningful for the running system, and only when systemd runs it.
live=0
if [ -z "$R" ] && [ -d /run/systemd/system ]; then live=1; fi

opt="$R/opt/ev-gateway"
venv="$opt/venv"
etc="$R/etc/ev-gateway"
unit="$R/etc/systemd/system/ev-gateway.service"
netdir="$R/etc/systemd/network"
network_files=(80-can0.network vcan0.netdev vcan0.network)
sysusers="$R/etc/sysusers.d/ev-gateway.conf"

put() {
  # put SRC DEST MODE: install a file unless DEST already has that content and
  # mode, so a second run leaves its mtime alone.
  if [ -f "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "${3#0}" ]; then
    return 0
  fi
  install -D -m "$3" "$1" "$2"
  say "installed ${2#"$R"}"
}

ensure_user() {
  # systemd-sysusers creates the system user and group from a declaration, also
  # inside --root, where it writes that tree's /etc/passwd and /etc/group.
  command -v systemd-sysusers >/dev/null 2>&1 || die "systemd-sysusers is missing (apt-get install systemd)"
  printf 'u %s - "EV gateway daemon" /var/lib/ev-gateway /usr/sbin/nologin\n' "$user" \
    >"$tmp/sysusers.conf"
  put "$tmp/sysusers.conf" "$sysusers" 0644
  systemd-sysusers --root="${R:-/}" ev-gateway.conf
}

group_id() {
  local gid
  gid="$(awk -F: -v g="$user" '$1 == g { print $3 }' "$R/etc/group")"
  [ -n "$gid" ] || die "no group $user in ${R:-}/etc/group"
  echo "$gid"
}

own() {
  # own PATH...: root:ev-gateway, so the daemon can read what it cannot change.
  # Only root can hand files to another group; a staging tree built without
  # root gets its owners fixed when the image is assembled.
  if [ "$(id -u)" -eq 0 ]; then chown "0:$(group_id)" "$@"; fi
}

install_venv() {
  if ! "$venv/bin/python" -c '' 2>/dev/null; then
    # Missing, or its interpreter went away with an OS upgrade: build it anew.
    rm -rf "$venv"
    install -d -m 0755 "$opt"
    "$python" -c 'import venv, ensurepip' 2>/dev/null \
      || die "$python cannot create a venv: apt-get install python3-venv"
    "$python" -m venv "$venv"
    say "created venv ${venv#"$R"}"
  fi
  local build="$tmp/build" wheel pip=("$venv/bin/python" -I -m pip)
  mkdir -p "$build"
  if [ -d "$from" ]; then
    [ -f "$from/pyproject.toml" ] || die "--from $from: no pyproject.toml there"
    # Build from a copy: pip builds in the source tree and would leave build/
    # and *.egg-info behind in the checkout.
    mkdir "$build/src"
    tar -C "$from" --exclude='./.*' --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -C "$build/src" -xf -
    "${pip[@]}" wheel -q --no-deps --disable-pip-version-check -w "$build" "$build/src"
    wheel="$(echo "$build"/*.whl)"
  elif [ -f "$from" ]; then
    wheel="$from"
  else
    die "--from $from: no such wheel or directory"
  fi
  local args=(-q --no-input --disable-pip-version-check --root-user-action=ignore)
  # pip skips a wheel whose version is installed already; an upgrade built from
  # newer code of the same version must still replace it.
  "${pip[@]}" install "${args[@]}" --no-deps --force-reinstall "$wheel"
  if [ "$no_deps" -eq 0 ]; then
    # Now that the new metadata is installed, pip adds what it requires, pinned.
    "${pip[@]}" install "${args[@]}" -c "$here/deploy/constraints.txt" "$wheel"
  fi
  "${pip[@]}" check >&2 || die "the venv lacks dependencies of this version: run without --no-deps"
  if [ -n "$R" ]; then
    # Scripts and pyvenv.cfg name the venv by its path at build time; make them
    # name /opt/ev-gateway/venv, where the venv is when this tree is booted.
    { grep -rlIZ -F "$venv" "$venv/bin" "$venv/pyvenv.cfg" || true; } \
      | xargs -0 -r sed -i "s|$venv|/opt/ev-gateway/venv|g"
  fi
  say "installed $("$venv/bin/python" -I -m gateway.cli --version) in ${venv#"$R"}"
}

install_data() {
  # The profiles and DBCs ship with the code, so an upgrade replaces them; a
  # profile of one's own goes in /etc/ev-gateway/ instead.
  local new="$opt/.dbc.new"
  rm -rf "$new"
  cp -R "$here/dbc" "$new"
  find "$new" -type d -exec chmod 0755 {} + && find "$new" -type f -exec chmod 0644 {} +
  if diff -r -q "$new" "$opt/dbc" >/dev/null 2>&1; then
    rm -rf "$new"
  else
    rm -rf "$opt/dbc" && mv "$new" "$opt/dbc"
    say "installed ${opt#"$R"}/dbc"
  fi
}

install_config() {
  install -d -m 0750 "$etc"
  own "$etc"
  local conf="$etc/gateway.toml"
  if [ -e "$conf" ]; then
    say "kept ${conf#"$R"}"
    return 0
  fi
  # The example names its profile relative to the repository; the installed
  # copy names the installed profile.
  local new="$conf.new"
  sed 's|^profile = "\.\./dbc/|profile = "/opt/ev-gateway/dbc/|' \
    "$here/deploy/gateway.example.toml" >"$new"
  if ! grep -q '^profile = "/opt/ev-gateway/dbc/' "$new"; then
    rm -f "$new"
    die "deploy/gateway.example.toml: no 'profile = \"../dbc/...\"' line to point at /opt"
  fi
  chmod 0640 "$new"
  own "$new"
  mv -f "$new" "$conf"
  fresh_config=1
  say "installed ${conf#"$R"}: set vehicle_id and [mqtt] before starting"
}

install_network() {
  [ -n "$can_bitrate" ] || [ "$vcan" -eq 1 ] || return 0
  if [ -n "$can_bitrate" ]; then
    sed "s/^BitRate=.*/BitRate=$can_bitrate/" "$here/deploy/network/80-can0.network" \
      >"$tmp/80-can0.network"
    put "$tmp/80-can0.network" "$netdir/80-can0.network" 0644
  fi
  if [ "$vcan" -eq 1 ]; then
    put "$here/deploy/network/vcan0.netdev" "$netdir/vcan0.netdev" 0644
    put "$here/deploy/network/vcan0.network" "$netdir/vcan0.network" 0644
  fi
  [ "$live" -eq 1 ] || return 0
  if ! systemctl is-enabled --quiet systemd-networkd.service; then
    # Turned on here (Raspberry Pi OS uses NetworkManager), networkd manages
    # only CAN links, which are never "online": its wait-online service, which
    # enabling networkd also enables, would delay every boot by its timeout.
    systemctl enable systemd-networkd.service
    systemctl disable systemd-networkd-wait-online.service
  fi
  if systemctl is-active --quiet systemd-networkd.service; then
    networkctl reload
    # A new bitrate needs the link reconfigured; can0 may not exist yet.
    networkctl reconfigure can0 2>/dev/null || true
  else
    systemctl start systemd-networkd.service
  fi
}

do_install() {
  ensure_user
  install_venv
  install_data
  install_config
  put "$here/deploy/systemd/ev-gateway.service" "$unit" 0644
  install_network
  if [ "$live" -eq 1 ]; then
    systemctl daemon-reload
    systemctl enable ev-gateway.service
    if [ "$fresh_config" -eq 1 ]; then
      # Started on the example, the gateway would queue messages under the example's
      # vehicle id and send them once the real broker is configured.
      say "ev-gateway.service enabled, not started: edit ${etc#"$R"}/gateway.toml, run" \
        "'ev-gateway check --config /etc/ev-gateway/gateway.toml', then" \
        "'systemctl start ev-gateway'"
    else
      # restart, not start: a second run is an upgrade and must run the new code.
      systemctl restart ev-gateway.service
      say "ev-gateway.service enabled and (re)started; logs: journalctl -u ev-gateway -f"
    fi
  else
    say "not the running system: run 'systemctl daemon-reload && systemctl enable --now ev-gateway' there"
  fi
}

do_uninstall() {
  if [ "$live" -eq 1 ]; then
    systemctl disable --now ev-gateway.service 2>/dev/null || true
  fi
  rm -f "$unit"
  local f removed_network=0
  for f in "${network_files[@]}"; do
    if [ -e "$netdir/$f" ]; then rm -f "$netdir/$f"; removed_network=1; fi
  done
  rm -rf "$opt"
  rm -f "$sysusers"
  if [ "$live" -eq 1 ]; then
    systemctl daemon-reload
    if [ "$removed_network" -eq 1 ] && systemctl is-active --quiet systemd-networkd.service; then
      networkctl reload
    fi
  fi
  say "removed the venv, the unit and the networkd files"
  if [ "$purge" -eq 1 ]; then
    # Drop-ins made with `systemctl edit ev-gateway` are local configuration too.
    rm -rf "$etc" "$R/var/lib/ev-gateway" "$unit.d"
    say "removed ${etc#"$R"}, /var/lib/ev-gateway and ${unit#"$R"}.d"
  else
    say "kept ${etc#"$R"} and /var/lib/ev-gateway (--purge removes them)"
  fi
  # The system user stays: a later user given its uid would own its old files.
  say "kept the system user $user"
}

if [ "$uninstall" -eq 1 ]; then do_uninstall; else do_install; fi
