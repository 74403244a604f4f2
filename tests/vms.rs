//! Real machines booting mint's instances: the real test master (Debian 12 with systemd,
//! cloud-init and a service answering HTTP with the host name, built from Debian's packages
//! by `tests/os/build-debian-master.sh` and cached under `target/mint-os/`, keyed by the
//! script's hash) imported as a disk master, and instances of it booted in QEMU (TCG) from
//! exactly the parts the engine serves: the shared master, each instance's own overlay and
//! its NoCloud seed. Each VM is on a bridge in a network namespace the test owns, on
//! 198.18.0.0/15.

use crate::support::{admin_auth, admin_token, root, scratch, start_daemon};
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One build of the master at a time; the others wait for it and use it.
static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The real test master's raw disk, built when the script changed since the last build.
pub fn debian_master() -> PathBuf {
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let script = root().join("tests/os/build-debian-master.sh");
    let hash = hex::encode(sha2::Sha256::digest(std::fs::read(&script).unwrap()));
    let dir = root().join("target/mint-os").join(&hash[..16]);
    let disk = dir.join("disk.raw");
    if disk.is_file() {
        return disk;
    }
    let staging = root().join("target/mint-os").join(format!("{}.building", &hash[..16]));
    let _ = std::fs::remove_dir_all(&staging);
    let t = Instant::now();
    let out = Command::new("bash").arg(&script).arg(&staging).output().expect("run the master's build script");
    assert!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).unwrap();
    eprintln!("built the real test master in {:.0?}", t.elapsed());
    disk
}

/// Whether QEMU can run here at all; the reason when it cannot.
fn qemu_missing() -> Option<String> {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("qemu-system-x86_64 --version failed: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("qemu-system-x86_64 cannot run ({e}); `cargo xtask setup` installs it")),
    }
}

/// A namespace holding a bridge at 198.18.8.254/24, and the VMs started on it; all stopped
/// and removed when dropped.
struct Lab {
    ns: String,
    vms: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let ns = format!("mintvm-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        crate::testbed::sh(&["ip", "netns", "add", &ns]);
        let lab = Lab { ns, vms: Vec::new() };
        lab.ip(&["link", "add", "br0", "type", "bridge"]);
        lab.ip(&["addr", "add", "198.18.8.254/24", "dev", "br0"]);
        lab.ip(&["link", "set", "br0", "up"]);
        lab.ip(&["link", "set", "lo", "up"]);
        lab
    }

    /// Runs `ip ARGS` in the namespace; it must succeed.
    fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.ns];
        full.extend_from_slice(args);
        crate::testbed::sh(&full);
    }

    /// Boots a VM from `disk` (its overlay, backed by the master beside it) and `seed`, on a
    /// tap of the bridge, its serial console written to `serial`.
    fn boot(&mut self, name: &str, disk: &Path, seed: &Path, serial: &Path, mac: &str) {
        let tap = format!("tap-{name}");
        self.ip(&["tuntap", "add", &tap, "mode", "tap"]);
        self.ip(&["link", "set", &tap, "master", "br0", "up"]);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "1", "-nographic", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()))
            .args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no"), "-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu");
        self.vms.push(child);
    }

    /// `GET http://{address}/` from inside the namespace, if it answers.
    fn get(&self, address: &str) -> Option<String> {
        let o = Command::new("ip").args(["netns", "exec", &self.ns, "curl", "-s", "-m", "2", &format!("http://{address}/")]).output().ok()?;
        (o.status.success() && !o.stdout.is_empty()).then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for vm in &mut self.vms {
            let _ = vm.kill();
            let _ = vm.wait();
        }
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.ns]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A process killed when dropped, also when the test fails.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256_file(p: &Path) -> String {
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[test]
fn two_disk_instances_of_a_real_master_boot_with_their_own_identities() {
    if let Some(why) = qemu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let master = debian_master();
    let _machine = crate::testbed::exclusive();
    let dir = scratch("vms-disk");
    let data = dir.join("data");
    let (daemon, url) = start_daemon(&data);
    let _daemon = Stopped(daemon);
    let auth = admin_auth(&data);
    let mint = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_mint")).args(args).arg("--json").env("MINT_SERVER", &url).env("MINT_TOKEN", admin_token(&data)).current_dir(root()).output().unwrap();
        assert!(o.status.success(), "mint {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let image = mint(&["image", "import", master.to_str().unwrap(), "--name", "debian-real"]);
    let spec = serde_json::json!({
        "name": "vm", "image": image["digest"], "max-instances": 4, "subnet": "198.18.8.0/24",
        "hostname": "vm-{index}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "noop"},
    });
    std::fs::write(dir.join("vm.json"), spec.to_string()).unwrap();
    mint(&["tier", "create", "-f", dir.join("vm.json").to_str().unwrap()]);

    // Each instance's parts, fetched as a node would, the master once under its name.
    let http = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let fetch = |path: &str, to: &Path| {
        let r = http.get(&format!("{url}{path}")).set("Authorization", &auth).call().unwrap();
        std::io::copy(&mut r.into_reader(), &mut std::fs::File::create(to).unwrap()).unwrap();
    };
    let mut lab = Lab::new();
    let mut vms = Vec::new();
    let mut master_file = None;
    for index in 0..2 {
        let desc: serde_json::Value = http.get(&format!("{url}/v1/artifacts/vm/{index}")).set("Authorization", &auth).call().unwrap().into_json().unwrap();
        let part = |role: &str| desc["parts"].as_array().unwrap().iter().find(|p| p["role"] == role).unwrap().clone();
        let (m, overlay, seed) = (part("master"), part("overlay"), part("seed"));
        let m_path = dir.join(m["name"].as_str().unwrap());
        if master_file.is_none() {
            fetch(m["url"].as_str().unwrap(), &m_path);
            master_file = Some((m_path.clone(), m["digest"].as_str().unwrap().to_string()));
        }
        let vm_dir = dir.join(format!("vm-{index}"));
        std::fs::create_dir_all(&vm_dir).unwrap();
        // The overlay names its backing file relative to itself: the master beside it.
        std::os::unix::fs::symlink(&m_path, vm_dir.join(m["name"].as_str().unwrap())).unwrap();
        let disk = vm_dir.join(overlay["name"].as_str().unwrap());
        fetch(overlay["url"].as_str().unwrap(), &disk);
        let seed_path = vm_dir.join(seed["name"].as_str().unwrap());
        fetch(seed["url"].as_str().unwrap(), &seed_path);
        let serial = vm_dir.join("serial.log");
        lab.boot(&format!("vm{index}"), &disk, &seed_path, &serial, &format!("52:54:00:18:08:{index:02x}"));
        vms.push((desc["address"].as_str().unwrap().to_string(), desc["hostname"].as_str().unwrap().to_string(), serial, Instant::now()));
    }

    // Both answer at their pre-assigned addresses with their own host names.
    let deadline = Instant::now() + Duration::from_secs(420);
    for (address, hostname, serial, started) in &vms {
        let answer = loop {
            if let Some(a) = lab.get(address) {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "{address} did not answer within 420 s; its console ends: {}",
                std::fs::read_to_string(serial).unwrap_or_default().lines().rev().take(15).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_secs(1));
        };
        assert_eq!(answer.trim(), hostname, "{address}");
        eprintln!("{hostname} answered at {address} {:.0?} after its VM started", started.elapsed());
        let console = std::fs::read_to_string(serial).unwrap();
        assert!(console.contains("Datasource DataSourceNoCloud"), "{hostname} did not use its NoCloud seed");
        assert!(!console.contains("DataSourceNone"), "{hostname} fell back to no datasource");
    }
    drop(lab);
    let (m_path, digest) = master_file.unwrap();
    assert_eq!(sha256_file(&m_path), digest, "the master is unchanged after both ran");
}
