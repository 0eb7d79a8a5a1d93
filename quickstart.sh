#!/bin/bash
# kvmdesk quick start on Debian 12, as root, from a clone of the repository:
#   ./quickstart.sh run    install what the controller needs and run it (embedded store, local agent)
#   ./quickstart.sh test   install what the test suite needs and run all of it
# Both are idempotent: packages already present are not installed again.
set -euo pipefail

# What a real single-machine setup needs: libvirtd + QEMU/KVM (virtlogd comes with libvirt-daemon),
# Open vSwitch for the virtual switches, and curl for the README's examples.
RUN_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev libvirt0 qemu-utils iproute2
              libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 openvswitch-switch kmod curl)
# curl is also what bench/transfer_bench.py uploads with, as an administrator's script would.
# systemd's runtime directory: present on a booted system, absent in containers and chroots.
SYSTEMD_DIR=${SYSTEMD_DIR:-/run/systemd/system}
# novnc: the console page's VNC viewer, served by the controller from /usr/share/novnc.
RUN_PACKAGES+=(novnc)
# chromium + chromium-driver: the console page's real-browser test (headless, driven by selenium).
TEST_PACKAGES=(chromium chromium-driver)

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

# A daemon runs when the pid in its pidfile is alive. Not pgrep: in a container or chroot that shares the
# host's pid namespace, pgrep sees the host's daemons, whose sockets this root cannot reach.
RUN_DIR=${RUN_DIR:-/run}
running() {
  local pid
  pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# Packages are installed with their services held back (policy-rc.d); `run` starts what it needs here,
# with systemd where it runs and by hand otherwise (containers, chroots).
prepare_kvm() {
  if [ -e /dev/kvm ]; then
    # QEMU runs as libvirt-qemu in group kvm: the device must be rw for that group (udev does this on
    # a booted system; a container or chroot has no udev).
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    echo "== /dev/kvm present: QEMU uses KVM"
  else
    echo "== no /dev/kvm: libvirtd still runs, but QEMU has no KVM acceleration; turn virtualisation on" \
         "(BIOS, or nested virtualisation for a VM) before running desktops"
  fi
}

start_libvirt() {
  if [ -d "$SYSTEMD_DIR" ]; then
    systemctl start virtlogd.socket libvirtd.socket virtlogd libvirtd 2>/dev/null || systemctl start virtlogd libvirtd
  else
    running virtlogd || virtlogd -d
    running libvirtd || libvirtd -d
  fi
  echo "== libvirtd and virtlogd are running"
}

# The datapath Open vSwitch can use here: the kernel's (`system`) when the openvswitch module loads,
# otherwise the userspace one (`netdev`), slower but working in containers.
ovs_datapath() {
  if modprobe openvswitch >/dev/null 2>&1; then echo system; else echo netdev; fi
}

start_ovs() {
  local datapath=$1
  if [ -d "$SYSTEMD_DIR" ] && [ "$datapath" = system ]; then
    systemctl start openvswitch-switch
  else
    local ctl=/usr/share/openvswitch/scripts/ovs-ctl
    running openvswitch/ovsdb-server || "$ctl" --no-ovs-vswitchd --system-id=random start
    if ! running openvswitch/ovs-vswitchd; then
      if [ "$datapath" = system ]; then
        "$ctl" --no-ovsdb-server start
      else
        # ovs-ctl insists on the kernel module; without it, ovs-vswitchd runs userspace bridges alone.
        mkdir -p /var/log/openvswitch
        ovs-vswitchd unix:/var/run/openvswitch/db.sock --pidfile --detach --log-file=/var/log/openvswitch/ovs-vswitchd.log
      fi
    fi
  fi
  echo "== Open vSwitch is running (datapath: $datapath)"
}

# A configuration layer for what this machine needs (read before the user's own --config, if any).
write_machine_config() {
  local datapath=$1 path=$2/quickstart.toml
  printf '# Written by quickstart.sh run for this machine.\n[network]\novs_datapath = "%s"\n' "$datapath" > "$path"
  echo "$path"
}

main() {
  cd "$(dirname "$0")"
  local mode=${1:-run}
  shift || true
  case "$mode" in
    run)
      need_root
      install_packages "${RUN_PACKAGES[@]}"
      install_python ""
      mkdir -p /var/lib/kvmdesk
      prepare_kvm
      start_libvirt
      local datapath
      datapath=$(ovs_datapath)
      start_ovs "$datapath"
      local config
      config=$(write_machine_config "$datapath" /var/lib/kvmdesk)
      echo "== starting the controller on http://127.0.0.1:50004/api/v1.0/ (Ctrl-C to stop)"
      exec .venv/bin/twistd -n --pidfile= kvmdesk --data-dir /var/lib/kvmdesk --config "$config" "$@"
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
}

# Sourced (tests call the functions one by one), nothing runs.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
