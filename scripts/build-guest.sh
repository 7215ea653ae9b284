#!/usr/bin/env bash
# Builds the lab's guest (`vmha lab up --guests qemu`): a small kernel compiled from Debian's
# linux-source-6.1 (`make tinyconfig` plus src/vmha/lab/guest/kernel.config: the drivers the guest
# uses built in, no modules) and an initramfs holding only vmha's disk writer
# (src/vmha/lab/guest/writer.c, linked static) as the guest's init. Under QEMU's emulation every
# driver probed costs boot time: this kernel reaches the writer's first record in about a third of the
# time Debian's cloud kernel took (BENCHMARKS.md, "guest boot").
# Output: $VMHA_GUEST_DIR (default /var/lib/vmha/lab-guest)/{vmlinux,initrd.img}. vmlinux is an ELF that
# QEMU boots through its PVH entry point: no real-mode loader, no decompression under emulation.
# Idempotent: rebuilds an image only when one of its inputs changed: the initramfs (a second) from
# writer.c, the kernel (about 4 min on 2 cores) from kernel.config and the kernel source package.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${VMHA_GUEST_DIR:-/var/lib/vmha/lab-guest}
src=$here/src/vmha/lab/guest
tarball=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -1)
[ -n "$tarball" ] || { echo "build-guest: linux-source-6.1 is not installed (/usr/src/linux-source-*.tar.xz)" >&2; exit 1; }
# An image's inputs as one digest (their contents and this script's), kept next to it in IMAGE.inputs:
# by content, not by file times, so a fresh clone or a pull that changes none of them rebuilds nothing.
digest() { cat "$0" "$@" | sha256sum | cut -d' ' -f1; }
fresh() { [ -s "$1" ] && [ "$(cat "$1.inputs" 2>/dev/null)" = "$2" ]; }
initrd_inputs=$(digest "$src/writer.c")
kernel_inputs=$(digest "$src/kernel.config" <(stat -c '%n %s %Y' "$tarball"))
mkdir -p "$out"
work=$(mktemp -d -p /var/tmp vmha-guest-build.XXXXXX)  # the kernel tree: about 1.5 GB while it builds
trap 'rm -rf "$work"' EXIT

if ! fresh "$out/initrd.img" "$initrd_inputs"; then
  root=$work/root
  mkdir -p "$root"/{dev,proc,sys}
  gcc -static -O2 -Wall -Wextra -Werror -o "$root/init" "$src/writer.c"
  # Not compressed: unpacking is cheaper than decompressing under emulation.
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd.img"
  mv "$work/initrd.img" "$out/initrd.img"
  echo "$initrd_inputs" > "$out/initrd.img.inputs"
  echo "build-guest: $out/initrd.img ($(du -k "$out/initrd.img" | cut -f1) KiB)"
fi
fresh "$out/vmlinux" "$kernel_inputs" && exit 0

tar -xJf "$tarball" -C "$work"
tree=$(ls -d "$work"/linux-source-*)
make -C "$tree" -s ARCH=x86_64 tinyconfig >"$work/config.log" 2>&1
"$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" "$src/kernel.config" >>"$work/config.log" 2>&1
make -C "$tree" -s ARCH=x86_64 olddefconfig >>"$work/config.log" 2>&1
# merge_config only warns about an option the kernel refused; refuse it here instead, naming it.
bad=0
while IFS= read -r line; do
  opt=${line%%=*}
  case "$line" in
    CONFIG_*=n) if grep -q "^$opt=" "$tree/.config"; then echo "build-guest: $opt is still set" >&2; bad=1; fi ;;
    CONFIG_*=*) if ! grep -qx "$line" "$tree/.config"; then echo "build-guest: $line did not take" >&2; bad=1; fi ;;
  esac
done < "$src/kernel.config"
[ "$bad" = 0 ] || exit 1
make -C "$tree" -s ARCH=x86_64 -j"$(nproc)" vmlinux >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; echo "build-guest: the kernel build failed" >&2; exit 1; }
# XEN_ELFNOTE_PHYS32_ENTRY (0x12): the PVH entry point QEMU's -kernel looks for in an ELF.
readelf -n "$tree/vmlinux" 2>/dev/null | grep -q 'Xen .*(0x00000012)' \
  || { echo "build-guest: the kernel built has no PVH entry point" >&2; exit 1; }
mv "$tree/vmlinux" "$out/vmlinux"
echo "$kernel_inputs" > "$out/vmlinux.inputs"
echo "build-guest: $out/vmlinux ($(basename "$tree"), $(du -k "$out/vmlinux" | cut -f1) KiB, PVH)"
