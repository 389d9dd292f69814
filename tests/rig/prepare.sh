#!/usr/bin/env bash
# Prepares the QEMU USB rig: Debian's own kernel, a Debian guest root with the USB gadget
# tools, and a small initramfs that mounts the root over 9p. Everything is cached under
# $PANTAU_RIG_CACHE (default /var/cache/pantau-rig), keyed by kernel version, so only the
# first run pays for it (about 2-3 minutes). Prints the cache directory on success.
# Needs root (apt-get, debootstrap) and the distribution's package mirror.
set -euo pipefail
cache_root=${PANTAU_RIG_CACHE:-/var/cache/pantau-rig}
log() { echo "rig: $*" >&2; }

need=()
for pair in qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap busybox:busybox-static cpio:cpio \
            depmod:kmod; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's current kernel ABI, read rather than pinned.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then apt-get update -qq; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); fi
kv=${kpkg#linux-image-}
dir="$cache_root/$kv"
mkdir -p "$dir"
cd "$dir"

if [ ! -f kernel/boot/vmlinuz-"$kv" ]; then
  log "fetching $kpkg"
  rm -rf kernel pkg && mkdir -p pkg && (cd pkg && apt-get download -qq "$kpkg")
  dpkg -x pkg/*.deb kernel
  rm -rf pkg
fi

# The guest root's packages. The root is rebuilt whenever this list changes (its marker holds the
# list), so every machine's cached root has them. curl: the one-command install (tests/test_rig.py).
packages=python3,kmod,usbutils,udev,iproute2,alsa-utils,v4l-utils,usbip,libusb-1.0-0,procps,curl
if [ "$(cat root/.pantau-ready 2>/dev/null)" != "$packages" ]; then
  log "building the guest root (debootstrap, about two minutes)"
  rm -rf root.new
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase --include="$packages" \
    bookworm root.new "${mirror:-http://deb.debian.org/debian}" >/dev/null
  mkdir -p root.new/lib/modules
  cp -a kernel/lib/modules/"$kv" root.new/lib/modules/
  depmod -b root.new "$kv"
  mkdir -p root.new/pantau root.new/opt/pantau-py
  echo "$packages" > root.new/.pantau-ready
  rm -rf root && mv root.new root
fi

if [ ! -f root/opt/pantau-py/.pantau-ready-2 ]; then
  log "installing the agent's Python packages for the guest"
  rm -rf root/opt/pantau-py && mkdir -p root/opt/pantau-py
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --target root/opt/pantau-py --no-compile pyusb psutil paho-mqtt pyudev >&2
  touch root/opt/pantau-py/.pantau-ready-2
fi

if [ ! -f initrd.img ]; then
  log "building the initramfs"
  rm -rf initrd && mkdir -p initrd/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$(command -v busybox)" initrd/bin/busybox
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci netfs fscache 9pnet \
           9pnet_virtio 9p; do
    f=$(find kernel/lib/modules/"$kv" -name "$m.ko*" | head -1 || true)
    [ -n "$f" ] && cp "$f" initrd/lib/modules/
  done
  cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p; do
  for f in /lib/modules/$m.ko*; do [ -e "$f" ] || continue
    case "$f" in *.xz) xz -dc "$f" > /tmp.ko; insmod /tmp.ko; rm -f /tmp.ko;; *) insmod "$f";; esac; done
done
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=262144 rootfs /newroot || exec sh
mkdir -p /newroot/pantau
# the checkout, uncached: host edits are visible at once
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 pantau /newroot/pantau || exec sh
umount /proc /sys; mount --move /dev /newroot/dev 2>/dev/null || true
exec switch_root /newroot /pantau/tests/rig/guest-init
INIT
  chmod +x initrd/init
  (cd initrd && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.img
  rm -rf initrd
fi
echo "$dir"
