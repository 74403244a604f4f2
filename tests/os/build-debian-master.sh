#!/usr/bin/env bash
# Builds the real test master from Debian's packages: a minbase Debian 12 root with the
# cloud kernel, systemd, cloud-init (NoCloud, then None) and netplan, and a small service
# that answers HTTP on port 80 with the machine's host name once cloud-init is done.
# Written as a partitioned raw disk (MBR, a FAT boot partition with syslinux, an ext4
# root) without loop devices or mounts.
#
#   tests/os/build-debian-master.sh OUT_DIR
#
# OUT_DIR receives disk.raw. Needs root, mmdebstrap, syslinux, mtools, dosfstools,
# e2fsprogs and fdisk (`cargo xtask setup` installs them).
set -euo pipefail
out=${1:?usage: build-debian-master.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mirror=${MINT_DEBIAN_MIRROR:-http://deb.debian.org/debian}

mmdebstrap --variant=minbase --quiet \
  --include=linux-image-cloud-amd64,initramfs-tools,systemd,systemd-sysv,udev,cloud-init,netplan.io,iproute2,python3 \
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
