#!/usr/bin/env bash
# Builds the real test master from Debian's packages: a minbase Debian 12 root with
# Debian's kernel (its drivers pruned to what servers and VMs boot from: disks, CDs,
# floppies, NICs), systemd, cloud-init (NoCloud, then None), netplan and live-boot, and a
# small service that answers HTTP on port 80 with the machine's host name once cloud-init
# is done. Written twice, without loop devices or mounts:
#   disk.raw    a partitioned raw disk: MBR, a FAT boot partition with syslinux, ext4 root;
#   master.iso  a hybrid ISO (isolinux; boots as a CD and as a disk): the same root as a
#               squashfs that live-boot mounts under a RAM overlay;
#   root.tar    the same root as a tree master, for network boot: it runs from memory
#               (no root device in fstab), its identity from its layer rather than from
#               cloud-init (disabled), its address from systemd-networkd.
#
#   tests/os/build-debian-master.sh OUT_DIR
#
# Needs root, mmdebstrap, syslinux, isolinux, xorriso, squashfs-tools, mtools,
# dosfstools, e2fsprogs and fdisk (`cargo xtask setup` installs them).
set -euo pipefail
out=${1:?usage: build-debian-master.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mirror=${MINT_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# The initramfs holds only the drivers a root is found with, so it stays small and a TCG
# guest unpacks it quickly; udev loads the rest from the root. Both files are in place
# before the kernel is installed, so its initramfs is built once, this way.
mkdir -p "$work/initramfs"
printf 'MODULES=list\n' > "$work/initramfs/mint.conf"
cat > "$work/initramfs/mint-modules" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk virtio_scsi virtio_net ata_piix ata_generic ahci sd_mod sr_mod \
  cdrom floppy ext4 vfat nls_cp437 nls_ascii iso9660 squashfs overlay loop; do
  manual_add_modules "$m"
done
HOOK
chmod 755 "$work/initramfs/mint-modules"

mmdebstrap --variant=minbase --quiet --aptopt='Apt::Install-Recommends "false"' \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"' \
  --essential-hook="copy-in $work/initramfs/mint.conf /etc/initramfs-tools/conf.d" \
  --essential-hook="copy-in $work/initramfs/mint-modules /etc/initramfs-tools/hooks" \
  --include=linux-image-amd64,initramfs-tools,live-boot,systemd,systemd-sysv,udev,cloud-init,netplan.io,iproute2,python3 \
  --customize-hook='cd "$1"/lib/modules/*/kernel && rm -rf sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging drivers/bluetooth drivers/iio net/wireless net/bluetooth net/mac80211 && chroot "$1" depmod -a "$(basename "$(dirname "$PWD")")"' \
  --customize-hook='printf "datasource_list: [NoCloud, None]\nlocale: C.UTF-8\n" > "$1/etc/cloud/cloud.cfg.d/90-mint.cfg"' \
  --customize-hook='printf "LABEL=mint-root / ext4 defaults 0 1\n" > "$1/etc/fstab"' \
  --customize-hook=': > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
  --customize-hook='mkdir -p "$1/usr/local/bin" "$1/etc/systemd/system/cloud-init.target.wants"' \
  --customize-hook='cat > "$1/usr/local/bin/mint-hello" <<"PY"
#!/usr/bin/python3
# Answers every HTTP request with the machine host name.
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (socket.gethostname() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("", 80), H).serve_forever()
PY
chmod 755 "$1/usr/local/bin/mint-hello"' \
  --customize-hook='cat > "$1/etc/systemd/system/mint-hello.service" <<"UNIT"
[Unit]
Description=mint test service: answers HTTP with the host name
After=cloud-final.service
Wants=cloud-final.service
[Service]
ExecStart=/usr/local/bin/mint-hello
Restart=on-failure
[Install]
WantedBy=cloud-init.target
UNIT
ln -sf /etc/systemd/system/mint-hello.service "$1/etc/systemd/system/cloud-init.target.wants/mint-hello.service"' \
  bookworm "$root" "$mirror"

kernel=$(ls "$root"/boot/vmlinuz-* | head -1)
initrd=$(ls "$root"/boot/initrd.img-* | head -1)
# The partitions: 1 MiB for the MBR and syslinux's gap, a 128 MiB FAT boot partition, the
# root with a quarter of its size to spare.
root_mib=$(( $(du -sm "$root" | cut -f1) * 5 / 4 + 64 ))
boot_start=2048; boot_sectors=$((128 * 2048))
root_start=$((boot_start + boot_sectors)); root_sectors=$((root_mib * 2048))
disk=$work/disk.raw
truncate -s $(( (root_start + root_sectors) * 512 )) "$disk"
sfdisk --quiet "$disk" <<TABLE
label: dos
start=$boot_start, size=$boot_sectors, type=c, bootable
start=$root_start, size=$root_sectors, type=83
TABLE
mkfs.vfat -F 16 -n MINTBOOT --offset $boot_start "$disk" $((boot_sectors / 2)) >/dev/null
cat > "$work/syslinux.cfg" <<CFG
DEFAULT mint
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL mint
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img root=LABEL=mint-root rw console=ttyS0,115200 net.ifnames=0
CFG
img="$disk@@$((boot_start * 512))"
MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$kernel" ::/vmlinuz
MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$initrd" ::/initrd.img
MTOOLS_SKIP_CHECK=1 mcopy -i "$img" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --offset $((boot_start * 512)) --install "$disk"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
mke2fs -q -t ext4 -L mint-root -d "$root" -E offset=$((root_start * 512)) "$disk" $((root_sectors / 2))k
mv "$disk" "$out/disk.raw"

# The hybrid ISO: isolinux boots live-boot's initramfs, which finds the medium holding
# live/filesystem.squashfs and mounts it under a RAM overlay (live-boot writes the live
# system's fstab, so the disk form's does not apply). Compressed with zstd: quick to
# build on two cores, quick to read under TCG.
iso=$work/iso
mkdir -p "$iso/isolinux" "$iso/live"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$iso/isolinux/"
cp "$kernel" "$iso/live/vmlinuz"
cp "$initrd" "$iso/live/initrd.img"
cat > "$iso/isolinux/isolinux.cfg" <<CFG
DEFAULT mint
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL mint
  KERNEL /live/vmlinuz
  APPEND initrd=/live/initrd.img boot=live console=ttyS0,115200 net.ifnames=0
CFG
mksquashfs "$root" "$iso/live/filesystem.squashfs" -comp zstd -noappend -quiet -no-progress -e boot
xorriso -as mkisofs -quiet -iso-level 3 -volid MINT_LIVE \
  -isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin -c isolinux/boot.cat -b isolinux/isolinux.bin \
  -no-emul-boot -boot-load-size 4 -boot-info-table -o "$work/master.iso" "$iso"
mv "$work/master.iso" "$out/master.iso"

# The tree master, changed after the disk and the ISO were written from the root.
: > "$root/etc/fstab"
touch "$root/etc/cloud/cloud-init.disabled"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /etc/systemd/system/mint-hello.service "$root/etc/systemd/system/multi-user.target.wants/mint-hello.service"
# Nothing here waits for the network to be "online" (the address is static, from the
# layer); the service starts once networkd has started.
ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
sed -i 's/^After=cloud-final.service$/After=systemd-networkd.service/; /^Wants=cloud-final.service$/d' "$root/etc/systemd/system/mint-hello.service"
tar --numeric-owner -C "$root" -cf "$work/root.tar" .
mv "$work/root.tar" "$out/root.tar"
