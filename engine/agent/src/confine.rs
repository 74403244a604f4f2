//! Confined services: a tree instance's service runs under an OCI runtime (Debian's
//! `crun` by default, `--oci-runtime`) with the instance's root as `/`, in mount, UTS (its
//! host name), PID and IPC namespaces of its own, sharing the node's network, where the
//! agent brought up the instance's pre-assigned address. It never runs unconfined.
//!
//! The agent sets no resource limits, so the runtime runs without a cgroup manager. It
//! starts in a mount namespace of its own where `/sys/fs/cgroup` is a cgroup v2 mount:
//! crun refuses a node whose hierarchy is hybrid (v1 controllers beside a v2 mount that
//! holds some) or absent (a sysfs mounted fresh, as `ip netns exec` does), and the node's
//! own view is never changed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The capabilities the service keeps: a container runtime's usual default set (binding
/// low ports, changing owners and users), nothing that reaches the node's kernel.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The container of deployment `generation` of `tier/index`.
pub fn container_id(tier: &str, index: u32, generation: u64) -> String {
    let tier: String = tier
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("mint-{tier}-{index}-{generation}")
}

/// The OCI runtime configuration of a service: `args` (the program is a path inside
/// `root`), `env`, and the instance's `hostname`.
pub fn config(root: &Path, args: &[String], env: &[String], hostname: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": root, "readonly": false },
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {
                "bounding": CAPABILITIES, "effective": CAPABILITIES, "permitted": CAPABILITIES,
            },
        },
        "hostname": hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "nodev", "mode=1777"] },
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    })
}

/// Whether `path` is a mount point of file system type `fstype`, from /proc/self/mounts.
fn mounted_as(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == path && f[2] == fstype
        })
}

/// Starts container `id` of the bundle `bundle` (holding `config.json`) with the runtime
/// `runtime`, its state under `state`; the runtime's process, which lives as long as the
/// service does.
pub fn start(runtime: &Path, state: &Path, bundle: &Path, id: &str) -> Result<Child, String> {
    let unified = mounted_as("/sys/fs/cgroup", "cgroup2");
    let mut cmd = Command::new(runtime);
    cmd.arg("--cgroup-manager=disabled")
        .arg("--root")
        .arg(state)
        .arg("run")
        .arg("--no-new-keyring")
        .arg("--bundle")
        .arg(bundle)
        .arg(id);
    let (cgroup, cgroup2, slash) = (c"/sys/fs/cgroup", c"cgroup2", c"/");
    // SAFETY: the closure runs in the child between fork and exec and makes only system
    // calls (unshare, mount, umount2) on strings made before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Best effort: a runtime that still cannot run says why on its own.
            if !unified {
                libc::mount(
                    cgroup2.as_ptr(),
                    cgroup.as_ptr(),
                    cgroup2.as_ptr(),
                    0,
                    std::ptr::null(),
                );
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        format!(
            "cannot start the OCI runtime {} ({e}); services run confined only: install Debian's crun (`cargo xtask setup` does) or give --oci-runtime",
            runtime.display()
        )
    })
}

/// Stops and removes container `id`, if it exists.
pub fn delete(runtime: &Path, state: &Path, id: &str) {
    let _ = Command::new(runtime)
        .arg("--cgroup-manager=disabled")
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Where the runtime keeps its containers' state for the agent rooted at `root`.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join("oci")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_its_root_host_name_and_namespaces_and_shares_the_network() {
        let c = config(
            Path::new("/srv/i/root"),
            &["/usr/bin/hello".into()],
            &["MINT_HOSTNAME=web-1".into()],
            "web-1",
        );
        assert_eq!(c["root"]["path"], "/srv/i/root");
        assert_eq!(c["hostname"], "web-1");
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        assert!(
            !ns.contains(&"network"),
            "the service keeps the node's network, with its address"
        );
        assert_eq!(container_id("web.tier", 3, 7), "mint-web_tier-3-7");
    }
}
