//! The real test operating system, shared by the VM tests and benchmarks: the real test
//! master (Debian 12 with systemd, cloud-init and a service answering HTTP with the host
//! name, built from Debian's packages by `tests/os/build-debian-master.sh` as a raw disk and
//! a hybrid live ISO, cached under `target/mint-os/` keyed by the script's hash), mint's
//! deploy ISO (`cargo xtask deploy-iso`), its boot stage (`cargo xtask boot-stage`), and
//! whether QEMU can run here.
#![allow(dead_code)]

use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository")
}

/// One build of the master at a time; the others wait for it and use it.
static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The real test master's raw disk, built when the script changed since the last build.
pub fn debian_master() -> PathBuf {
    debian_master_build().join("disk.raw")
}

/// The real test master as a hybrid ISO (a live system), from the same build.
pub fn debian_master_iso() -> PathBuf {
    debian_master_build().join("master.iso")
}

/// The real test master as a tree (a tar of its root) for network boot, from the same
/// build.
pub fn debian_master_tree() -> PathBuf {
    debian_master_build().join("root.tar")
}

/// The directory of the real test master's build (`disk.raw`, `master.iso`, `root.tar`), built when
/// the script changed since the last build.
fn debian_master_build() -> PathBuf {
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let script = root().join("tests/os/build-debian-master.sh");
    let hash = hex::encode(sha2::Sha256::digest(std::fs::read(&script).unwrap()));
    let dir = root().join("target/mint-os").join(&hash[..16]);
    if ["disk.raw", "master.iso", "root.tar"]
        .iter()
        .all(|f| dir.join(f).is_file())
    {
        return dir;
    }
    let staging = root()
        .join("target/mint-os")
        .join(format!("{}.building", &hash[..16]));
    let _ = std::fs::remove_dir_all(&staging);
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&staging)
        .output()
        .expect("run the master's build script");
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).unwrap();
    eprintln!("built the real test master in {:.0?}", t.elapsed());
    dir
}

/// Whether QEMU can run here at all; the reason when it cannot.
pub fn qemu_missing() -> Option<String> {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "qemu-system-x86_64 --version failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Some(format!(
            "qemu-system-x86_64 cannot run ({e}); `cargo xtask setup` installs it"
        )),
    }
}

/// mint's deploy ISO, built by `cargo xtask deploy-iso` when it is missing or older than
/// the `mint-agent` it carries.
pub fn deploy_iso() -> PathBuf {
    built_by_xtask("deploy-iso", "deploy.iso")
}

/// mint's boot stage (`cargo xtask boot-stage`), rebuilt when `mint-agent` is newer.
pub fn boot_stage() -> PathBuf {
    built_by_xtask("boot-stage", "boot-stage.cpio")
}

/// What `cargo xtask TASK --out target/mint-deploy/FILE` builds, rebuilt when it is older
/// than the `mint-agent` it holds.
fn built_by_xtask(task: &str, file: &str) -> PathBuf {
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let out = root().join("target/mint-deploy").join(file);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out).is_none()
        || modified(&out) < modified(Path::new(env!("CARGO_BIN_EXE_mint-agent")))
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let o = Command::new(cargo)
            .args(["xtask", task, "--out"])
            .arg(&out)
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| panic!("run cargo xtask {task}: {e}"));
        assert!(
            o.status.success(),
            "cargo xtask {task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim());
    }
    out
}
