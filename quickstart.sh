#!/bin/bash
# kvmdesk quick start on Debian 12, as root, from a clone of the repository:
#   ./quickstart.sh run    install what the controller needs and run it (embedded store, local agent)
#   ./quickstart.sh test   install what the test suite needs and run all of it
# Both are idempotent: packages already present are not installed again.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-run}
shift || true

RUN_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev libvirt0 qemu-utils iproute2)
# novnc: the console page's VNC viewer, served by the controller from /usr/share/novnc.
RUN_PACKAGES+=(novnc)
# curl: bench/transfer_bench.py uploads with it, as an administrator's script would.
TEST_PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 openvswitch-switch curl)
# chromium + chromium-driver: the console page's real-browser test (headless, driven by selenium).
TEST_PACKAGES+=(chromium chromium-driver)

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "quickstart.sh: run as root (it installs Debian packages)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Services from these packages are started by kvmdesk's test setup when needed, not at install.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    rm -f /usr/sbin/policy-rc.d
  fi
}

install_python() {
  local extras=$1
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    /usr/bin/python3 -m venv .venv 2>/dev/null || python3 -m venv .venv
  fi
  echo "== installing kvmdesk${extras} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # compat mode puts the checkout itself on sys.path, so twistd finds twisted/plugins/kvmdesk_plugins.py.
  .venv/bin/python -m pip install -q -e ".${extras}" --config-settings editable_mode=compat
}

case "$MODE" in
  run)
    need_root
    install_packages "${RUN_PACKAGES[@]}"
    install_python ""
    mkdir -p /var/lib/kvmdesk
    echo "== starting the controller on http://127.0.0.1:50004/api/v1.0/ (Ctrl-C to stop)"
    exec .venv/bin/twistd -n --pidfile= kvmdesk --data-dir /var/lib/kvmdesk "$@"
    ;;
  test)
    need_root
    install_packages "${RUN_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
    install_python "[test]"
    echo "== running the test suite"
    exec .venv/bin/python -m pytest -q -rs "$@"
    ;;
  *)
    echo "usage: $0 run|test [extra arguments]" >&2
    exit 2
    ;;
esac
