//! `cargo xtask boot-stage [--out FILE]`: builds mint's boot stage, the initramfs a
//! network-booted node runs before it becomes its instance. It holds busybox and
//! `mint-agent`; `/init` loads the NIC drivers the engine adds beside it (the master's own
//! modules, so they match the master's kernel), mounts a tmpfs, runs `mint-agent boot`
//! (network up at the instance's address, layers fetched and checked, unpacked into the
//! tmpfs, the boot reported) and `switch_root`s into the instance's own init.
//!
//! The daemon serves it to iPXE when started with `[netboot] stage = "FILE"`. It holds no
//! kernel and no modules, so one boot stage serves every master.

use std::path::Path;

use crate::deploy_iso::{Start, cpio, start, unpack, userland};

/// The busybox applets `/init` and `mint-agent boot` use.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "mkdir",
    "modprobe",
    "sleep",
    "cat",
    "echo",
    "ip",
    "switch_root",
    "ls",
];

const INIT: &str = r#"#!/bin/sh
# mint's boot stage: the instance fetched into memory, then the instance's own init.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The master's NIC drivers, which the engine serves beside this stage.
for m in $(cat /etc/mint-modules 2>/dev/null); do modprobe "$m" 2>/dev/null; done
mkdir -p /newroot
mount -t tmpfs -o mode=0755,size=90% instance /newroot
if mint-agent boot --root /newroot; then
  echo "mint boot stage: switching to the instance"
  for d in dev proc sys; do
    mkdir -p "/newroot/$d"
    mount -o move "/$d" "/newroot/$d"
  done
  exec switch_root /newroot /sbin/init
fi
echo "mint boot stage: the instance could not be booted; the engine has been told why"
while true; do sleep 3600; done
"#;

/// Builds the boot stage at `out` (an uncompressed `newc` archive).
pub fn build(out: &Path) -> Result<(), String> {
    let started = std::time::Instant::now();
    let Start { agent, debs, work } = start("boot-stage")?;
    let (broot, root) = (work.join("busybox"), work.join("root"));
    unpack("busybox-static", &debs, &broot)?;
    userland(
        &root,
        &broot,
        &agent,
        APPLETS,
        &["proc", "sys", "dev", "etc", "tmp", "newroot"],
        INIT,
    )?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let staged = out.with_extension("building");
    std::fs::write(&staged, cpio(&root)?).map_err(|e| e.to_string())?;
    std::fs::rename(&staged, out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!(
        "boot stage {} ({} MiB) built in {:.0?}",
        out.display(),
        size >> 20,
        started.elapsed()
    );
    Ok(())
}
