//! `cargo xtask deploy-iso [--out FILE]`: builds mint's deploy ISO, the small Linux a BMC
//! boots from its virtual CD to put a disk master on a server's own disk. It holds Debian's
//! kernel (the drivers a server's disks, CDs, floppy and NICs need, and nothing else),
//! busybox, and `mint-agent`, which `/init` runs as `mint-agent write-disk` with the
//! deployment's configuration from the virtual floppy (or USB stick). Built from Debian's
//! packages (`apt-get download`, unpacked with `dpkg-deb`, never installed), an initramfs
//! written here in the kernel's `newc` format, and isolinux with xorriso: a hybrid ISO.
//!
//! The daemon serves it to BMCs when started with `[deploy] iso = "FILE"`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The drivers the deploy system loads (with what they need): virtual and common disks,
/// CDs and floppies, the file system of its configuration volume, and common NICs.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "ata_piix",
    "ata_generic",
    "ahci",
    "nvme",
    "sd_mod",
    "sr_mod",
    "floppy",
    "usb_storage",
    "uas",
    "xhci_pci",
    "ehci_pci",
    "uhci_hcd",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "tg3",
    "bnxt_en",
    "r8169",
];

/// The busybox applets `/init` and `mint-agent` use.
const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "mkdir", "modprobe", "sleep", "cat", "echo", "ip", "poweroff", "ls",
    "seq",
];

const INIT: &str = r#"#!/bin/sh
# mint's deploy system: find the deployment's configuration, write the disk, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/mint-modules); do modprobe "$m" 2>/dev/null; done
echo "mint deploy system: looking for the deployment's configuration"
mkdir -p /cfg
for attempt in $(seq 1 60); do
  for dev in /dev/fd0 /dev/sd? /dev/sd?1 /dev/vd? /dev/vd?1; do
    [ -b "$dev" ] || continue
    if mount -t vfat -o ro "$dev" /cfg 2>/dev/null; then
      if [ -f /cfg/deploy.json ]; then
        echo "mint deploy system: configuration on $dev"
        mint-agent write-disk --config /cfg/deploy.json
        echo "mint deploy system: the write failed; the engine has been told why"
        while true; do sleep 3600; done
      fi
      umount /cfg
    fi
  done
  sleep 1
done
echo "mint deploy system: no volume holds deploy.json; the BMC did not insert the deployment's configuration"
while true; do sleep 3600; done
"#;

/// A system tool that may be outside the PATH (`/usr/sbin` often is, for tasks run by cargo).
fn sbin(tool: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| tool.into())
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Downloads (once, kept in `debs`) and unpacks Debian package `package` into `into`.
pub(crate) fn unpack(package: &str, debs: &Path, into: &Path) -> Result<(), String> {
    let have = |debs: &Path| -> Option<PathBuf> {
        std::fs::read_dir(debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
    };
    let deb = match have(debs) {
        Some(d) => d,
        None => {
            run(Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(debs))
            .or_else(|_| {
                run(Command::new("apt-get").args(["update", "-q"])).and_then(|_| {
                    run(Command::new("apt-get")
                        .args(["download", "-q", package])
                        .current_dir(debs))
                })
            })?;
            have(debs).ok_or_else(|| format!("apt-get download {package} left no package"))?
        }
    };
    run(Command::new(sbin("dpkg-deb")).arg("-x").arg(&deb).arg(into)).map(|_| ())
}

/// The initramfs of the tree `root`, as an uncompressed `newc` archive.
pub(crate) fn cpio(root: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
        {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    let mut out = mint_initramfs::Newc::new();
    for p in &paths {
        let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(p).map_err(|e| e.to_string())?;
            out.symlink(&name, &target.to_string_lossy());
        } else if meta.is_dir() {
            out.dir(&name);
        } else {
            let data = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            out.file(&name, meta.permissions().mode(), &data);
        }
    }
    Ok(out.finish())
}

/// Copies `file` to the same path under `root`, creating its directories.
fn copy_into(root: &Path, file: &Path) -> Result<(), String> {
    let to = root.join(file.strip_prefix("/").unwrap_or(file));
    std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
    std::fs::copy(file, &to).map_err(|e| format!("copying {}: {e}", file.display()))?;
    Ok(())
}

/// The shared libraries `binary` loads, as `ldd` resolves them here.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let text = run(Command::new("ldd").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l
                .split("=>")
                .nth(1)
                .unwrap_or(l)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// What both initramfs builders start from: `mint-agent` built, the package cache
/// (`target/mint-deploy/debs`) and an empty work directory `target/mint-deploy/{work}`.
pub(crate) struct Start {
    pub agent: PathBuf,
    pub debs: PathBuf,
    pub work: PathBuf,
}

pub(crate) fn start(work: &str) -> Result<Start, String> {
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "mint",
        "--bin",
        "mint-agent",
    ]))?;
    let agent = Path::new("target/release/mint-agent")
        .canonicalize()
        .map_err(|e| format!("target/release/mint-agent: {e}"))?;
    let base = Path::new("target/mint-deploy");
    let debs = base.join("debs");
    let work = base.join(work);
    let _ = std::fs::remove_dir_all(&work);
    for d in [&debs, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let debs = debs.canonicalize().map_err(|e| e.to_string())?;
    Ok(Start { agent, debs, work })
}

/// Puts busybox (from `broot`, unpacked busybox-static) with `applets`, `agent` with its
/// libraries, the directories `dirs` and the executable `/init` into the initramfs tree
/// `root`.
pub(crate) fn userland(
    root: &Path,
    broot: &Path,
    agent: &Path,
    applets: &[&str],
    dirs: &[&str],
    init: &str,
) -> Result<(), String> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    std::fs::copy(broot.join("bin/busybox"), bin.join("busybox"))
        .map_err(|e| format!("busybox: {e}"))?;
    for a in applets {
        std::os::unix::fs::symlink("busybox", bin.join(a)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(agent, bin.join("mint-agent")).map_err(|e| e.to_string())?;
    for lib in libraries(agent)? {
        copy_into(root, &lib)?;
    }
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(root.join("init"), init).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())
}

/// Builds the deploy ISO at `out`.
pub fn build(out: &Path) -> Result<(), String> {
    let started = std::time::Instant::now();
    let Start { agent, debs, work } = start("work")?;
    let depends =
        run(Command::new("apt-cache").args(["depends", "--no-recommends", "linux-image-amd64"]))?;
    let kernel_package = depends
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
        })
        .ok_or("apt-cache knows no kernel behind linux-image-amd64; run apt-get update")?
        .to_string();
    let (kroot, broot, root, iso) = (
        work.join("kernel"),
        work.join("busybox"),
        work.join("initramfs"),
        work.join("iso"),
    );
    unpack(&kernel_package, &debs, &kroot)?;
    unpack("busybox-static", &debs, &broot)?;
    let version = kernel_package
        .trim_start_matches("linux-image-")
        .to_string();
    run(Command::new(sbin("depmod"))
        .arg("-b")
        .arg(&kroot)
        .arg(&version))?;
    let modules = kroot.join("lib/modules").join(&version);
    let dep = std::fs::read_to_string(modules.join("modules.dep"))
        .map_err(|e| format!("modules.dep: {e}"))?;
    let wanted = mint_initramfs::module_closure(&dep, MODULES);
    let into = root.join("lib/modules").join(&version);
    for m in &wanted {
        let to = into.join(m);
        std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::copy(modules.join(m), &to).map_err(|e| format!("{m}: {e}"))?;
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if modules.join(f).exists() {
            std::fs::copy(modules.join(f), into.join(f)).map_err(|e| e.to_string())?;
        }
    }
    run(Command::new(sbin("depmod"))
        .arg("-b")
        .arg(&root)
        .arg(&version))?;
    userland(
        &root,
        &broot,
        &agent,
        APPLETS,
        &["proc", "sys", "dev", "cfg", "etc", "tmp"],
        INIT,
    )?;
    std::fs::write(root.join("etc/mint-modules"), MODULES.join("\n") + "\n")
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(iso.join("isolinux")).map_err(|e| e.to_string())?;
    for (from, to) in [
        ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux/isolinux.bin"),
        (
            "/usr/lib/syslinux/modules/bios/ldlinux.c32",
            "isolinux/ldlinux.c32",
        ),
    ] {
        std::fs::copy(from, iso.join(to))
            .map_err(|e| format!("{from}: {e} (cargo xtask setup installs isolinux)"))?;
    }
    std::fs::copy(
        kroot.join(format!("boot/vmlinuz-{version}")),
        iso.join("vmlinuz"),
    )
    .map_err(|e| format!("the kernel: {e}"))?;
    let mut initrd = std::fs::File::create(iso.join("initrd.img")).map_err(|e| e.to_string())?;
    initrd.write_all(&cpio(&root)?).map_err(|e| e.to_string())?;
    std::fs::write(
        iso.join("isolinux/isolinux.cfg"),
        "DEFAULT deploy\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL deploy\n  KERNEL /vmlinuz\n  APPEND initrd=/initrd.img console=tty0 console=ttyS0,115200 net.ifnames=0 quiet\n",
    )
    .map_err(|e| e.to_string())?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let staged = out.with_extension("iso.building");
    run(Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-iso-level",
            "3",
            "-volid",
            "MINT_DEPLOY",
        ])
        .args([
            "-isohybrid-mbr",
            "/usr/lib/ISOLINUX/isohdpfx.bin",
            "-c",
            "isolinux/boot.cat",
            "-b",
            "isolinux/isolinux.bin",
        ])
        .args([
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "-o",
        ])
        .arg(&staged)
        .arg(&iso))?;
    std::fs::rename(&staged, out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!(
        "deploy ISO {} ({} MiB, kernel {version}, {} modules) built in {:.0?}",
        out.display(),
        size >> 20,
        wanted.len(),
        started.elapsed()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initramfs_holds_the_tree_with_its_links_and_modes() {
        let dir = std::env::temp_dir().join(format!("mint-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("init"), "#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
        let out = cpio(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out);
        for name in ["bin\0", "bin/sh\0", "init\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name:?} missing");
        }
        assert!(text.contains("busybox"));
    }
}
