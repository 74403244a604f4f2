//! VM mode (`mint-agent run --vm`): the node is a VM host slot, and its disk instance runs
//! as a QEMU guest on the node's tap. The guest boots from the instance's own overlay
//! (backed by the master the node caches, which QEMU opens read-only) with its NoCloud
//! seed as a second disk; its MAC is derived from the instance's identity, so a
//! replacement VM on another host is the same machine to its neighbours as well.
//!
//! QEMU runs daemonized, with its pid in the deployment's directory and a QMP socket
//! beside it: the VM outlives an agent restart, and the restarted agent finds it again by
//! its pid (checked against its command line, so a recycled pid is never taken for it).

use crate::instance::ip;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How QEMU accelerates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Binary translation: slow, and works everywhere (also nested, where KVM may hang).
    Tcg,
    /// The kernel's hypervisor, where /dev/kvm works.
    Kvm,
}

/// The VM host slot's settings, from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// Boot disk instances as QEMU guests on this node's tap (the node is a VM host slot).
    /// Without it, a disk instance's files are staged for something else to boot.
    #[arg(long)]
    pub vm: bool,
    /// The tap the guest's network interface uses.
    #[arg(long, default_value = "mint-tap0", requires = "vm")]
    pub vm_tap: String,
    /// The bridge the tap joins; the agent creates the tap on it when it does not exist.
    /// Without it, the tap must exist, set up by the node's own network configuration.
    #[arg(long, requires = "vm")]
    pub vm_bridge: Option<String>,
    /// The guest's memory, in MiB.
    #[arg(long, default_value_t = 1024, requires = "vm")]
    pub vm_memory_mib: u64,
    /// The guest's virtual CPUs.
    #[arg(long, default_value_t = 1, requires = "vm")]
    pub vm_cpus: u32,
    /// How QEMU runs the guest. KVM inside a VM (nested) often hangs silently: use it only
    /// where a guest has been seen to boot under it.
    #[arg(long, value_enum, default_value_t = Accel::Tcg, requires = "vm")]
    pub vm_accel: Accel,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", requires = "vm")]
    pub qemu: PathBuf,
}

/// The guest's MAC address for an instance: locally administered (QEMU's 52:54:00 prefix),
/// the rest from a hash of the tier and index, so that the same instance gets the same MAC
/// on every host.
pub fn mac_for(tier: &str, index: u32) -> String {
    // FNV-1a: stable across releases and platforms, which std's hasher is not.
    let mut h: u32 = 0x811c_9dc5;
    for b in tier.bytes().chain([0]).chain(index.to_be_bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// Makes sure the tap exists, is up, and (with --vm-bridge) is on the bridge.
fn ensure_tap(args: &VmArgs) -> Result<(), String> {
    let exists = Path::new("/sys/class/net").join(&args.vm_tap).exists();
    match (&args.vm_bridge, exists) {
        (None, false) => {
            return Err(format!(
                "the tap `{}` does not exist: create it on the node's bridge, or give --vm-bridge BRIDGE",
                args.vm_tap
            ));
        }
        (Some(_), false) => ip(&["tuntap", "add", "dev", &args.vm_tap, "mode", "tap"])?,
        _ => {}
    }
    if let Some(bridge) = &args.vm_bridge {
        ip(&["link", "set", &args.vm_tap, "master", bridge])?;
    }
    ip(&["link", "set", &args.vm_tap, "up"])
}

/// The files of a deployment's VM in its directory.
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

/// Boots the staged disk instance in `dir`: `disk` is its overlay, `seed` its NoCloud seed.
/// Returns QEMU's pid once QEMU has opened everything and the guest runs.
pub fn boot(
    args: &VmArgs,
    dir: &Path,
    disk: &Path,
    seed: &Path,
    tier: &str,
    index: u32,
) -> Result<u32, String> {
    ensure_tap(args)?;
    let accel = match args.vm_accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
    };
    // Paths go into QEMU's option syntax, where a comma separates options.
    if [dir, disk, seed]
        .iter()
        .any(|p| p.to_string_lossy().contains(','))
    {
        return Err(format!(
            "{} holds a `,`, which QEMU's options cannot carry; choose a --root without one",
            dir.display()
        ));
    }
    let mac = mac_for(tier, index);
    let out = Command::new(&args.qemu)
        .args([
            "-name",
            &format!("mint-{tier}-{index}"),
            "-machine",
            &format!("q35,accel={accel}"),
        ])
        .args([
            "-m",
            &args.vm_memory_mib.to_string(),
            "-smp",
            &args.vm_cpus.to_string(),
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-vga",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("serial.log").display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            seed.display()
        ))
        .args([
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", args.vm_tap),
        ])
        .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={mac}")])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            qmp_socket(dir).display()
        ))
        .arg("-pidfile")
        .arg(pid_file(dir))
        .arg("-daemonize")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (install QEMU, or give --qemu PATH)",
                args.qemu.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "QEMU did not start the VM: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // QEMU writes its pid file before it returns from daemonizing.
    let pid = std::fs::read_to_string(pid_file(dir))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    pid.ok_or_else(|| {
        format!(
            "QEMU started but left no pid in {}",
            pid_file(dir).display()
        )
    })
}

/// Whether `pid` is the QEMU of the deployment in `dir` (and not a process that got its
/// number after that QEMU exited).
pub fn is_ours(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = pid_file(dir);
    use std::os::unix::ffi::OsStrExt as _;
    cmdline
        .split(|b| *b == 0)
        .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == wanted)
}

/// Asks the VM's QMP socket for the guest's run state (`running`, `paused`, `shutdown`,
/// `guest-panicked`, ...). `None` when QEMU does not answer within a second.
pub fn run_state(dir: &Path) -> Option<String> {
    let stream = UnixStream::connect(qmp_socket(dir)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The greeting, then the answers; asynchronous events may come between them.
    let mut answer = |reader: &mut BufReader<UnixStream>| -> Option<serde_json::Value> {
        for _ in 0..16 {
            line.clear();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&line).ok()?;
            if v.get("return").is_some() || v.get("error").is_some() || v.get("QMP").is_some() {
                return Some(v);
            }
        }
        None
    };
    answer(&mut reader)?;
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .ok()?;
    answer(&mut reader)?;
    writer.write_all(b"{\"execute\":\"query-status\"}\n").ok()?;
    let v = answer(&mut reader)?;
    v["return"]["status"].as_str().map(str::to_string)
}

/// Stops the VM: SIGTERM (QEMU closes its files and exits, as a power-off would leave the
/// disk), then SIGKILL after a few seconds.
pub fn stop(pid: u32, dir: &Path) {
    if !is_ours(pid, dir) {
        return;
    }
    // SAFETY: signals to a pid checked just above to be this deployment's QEMU.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && is_ours(pid, dir) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_ours(pid, dir) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    // QEMU is not this process's child (it daemonized): init reaps it. Wait until it has
    // gone, so the overlay is closed before its directory is removed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && Path::new(&format!("/proc/{pid}")).exists()
        && is_ours(pid, dir)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_per_instance_and_differ_between_instances() {
        assert_eq!(mac_for("web", 3), mac_for("web", 3));
        let macs: std::collections::BTreeSet<String> = (0..64)
            .map(|i| mac_for("web", i))
            .chain((0..64).map(|i| mac_for("db", i)))
            .collect();
        assert_eq!(macs.len(), 128);
        for m in &macs {
            assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        }
        // Tier and index are kept apart: "web1"/0 is not "web"/1-ish.
        assert_ne!(mac_for("web1", 0), mac_for("web", 1));
    }

    #[test]
    fn a_missing_tap_without_a_bridge_is_refused_naming_the_fix() {
        let args = VmArgs {
            vm: true,
            vm_tap: "mint-no-such0".into(),
            vm_bridge: None,
            vm_memory_mib: 256,
            vm_cpus: 1,
            vm_accel: Accel::Tcg,
            qemu: "qemu-system-x86_64".into(),
        };
        let e = ensure_tap(&args).unwrap_err();
        assert!(
            e.contains("mint-no-such0") && e.contains("--vm-bridge"),
            "{e}"
        );
    }

    #[test]
    fn a_pid_that_is_not_the_deployments_qemu_is_not_taken_for_it() {
        let dir = std::env::temp_dir().join("mint-vm-is-ours");
        assert!(!is_ours(std::process::id(), &dir));
        assert!(!is_ours(u32::MAX - 1, &dir));
        assert_eq!(run_state(&dir), None);
    }
}
