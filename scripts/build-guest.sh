#!/usr/bin/env bash
# Builds the lab's guest (`vmha lab up --guests qemu`): Debian's cloud kernel (linux-image-cloud-amd64)
# and an initramfs holding its virtio modules and vmha's disk writer (src/vmha/lab/guest/writer.c,
# linked static), which is the guest's init. No shell: under QEMU's emulation every program started
# costs boot time. Output: $VMHA_GUEST_DIR (default /var/lib/vmha/lab-guest)/{vmlinux,initrd.img}.
# vmlinux is the kernel uncompressed, an ELF that QEMU boots through its PVH entry point: no real-mode
# loader, no decompression under emulation (with the qboot firmware: about 1 s less per boot).
# Idempotent: rebuilds only when an input is newer than the image.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${VMHA_GUEST_DIR:-/var/lib/vmha/lab-guest}
src=$here/src/vmha/lab/guest
kver=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1)
[ -n "$kver" ] || { echo "build-guest: linux-image-cloud-amd64 is not installed" >&2; exit 1; }
kernel=/boot/vmlinuz-$kver
if [ -s "$out/initrd.img" ] && [ -s "$out/vmlinux" ] && [ "$out/initrd.img" -nt "$src/writer.c" ] && [ "$out/initrd.img" -nt "$kernel" ] \
   && [ "$out/initrd.img" -nt "$0" ]; then
  exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{dev,proc,sys,lib/modules}
gcc -static -O2 -Wall -Wextra -Werror -o "$root/init" "$src/writer.c"
# The virtio drivers this kernel builds as modules, in load order (modules.dep lists dependencies first).
mods=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console)
: > "$root/modules.order"
for m in "${mods[@]}"; do
  f=$(find "/lib/modules/$kver/kernel" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "build-guest: module $m not found for $kver" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m.ko" >> "$root/modules.order"
done
# Not compressed: unpacking is cheaper than decompressing under emulation.
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd.img"
# The bzImage's payload: Debian's cloud kernel is LZ4-compressed (legacy frame, magic 02 21 4c 18);
# lz4 stops with an error at the bzImage's trailer after the frame, so the ELF check below decides.
off=$(grep -obUaP '\x02\x21\x4c\x18' "$kernel" | head -1 | cut -d: -f1)
[ -n "$off" ] || { echo "build-guest: no LZ4 payload in $kernel (only LZ4 kernels are unpacked)" >&2; exit 1; }
tail -c +$((off + 1)) "$kernel" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
# XEN_ELFNOTE_PHYS32_ENTRY (0x12): the PVH entry point QEMU's -kernel looks for in an ELF.
readelf -n "$work/vmlinux" 2>/dev/null | grep -q 'Xen .*(0x00000012)' \
  || { echo "build-guest: $kernel unpacked is not an ELF kernel with a PVH entry point" >&2; exit 1; }
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initrd.img" "$out/initrd.img"
rm -f "$out/vmlinuz"  # the compressed kernel earlier versions booted
echo "build-guest: $out/vmlinux ($kver, PVH) and $out/initrd.img ($(du -k "$out/initrd.img" | cut -f1) KiB)"
