//! A libvirtd of the test's own, for sushy-tools' libvirt backend: Debian's libvirt 9.0,
//! run without systemd inside a network namespace the test owns (so its guests' taps join
//! the namespace's bridge, on 198.18.0.0/15) and a private mount namespace where its
//! configuration, state, logs and runtime files are the test's directories, not the
//! machine's. Its socket is in the test's directory too; the emulator and `virsh` reach it
//! by path. Domains are TCG guests (`<domain type='qemu'>`) of the `pc` machine, which has
//! the IDE controller and the floppy controller sushy-tools attaches virtual media to.
//! Everything is stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running libvirtd, its namespace and its domains.
pub struct Libvirt {
    /// The network namespace the daemon and its guests live in.
    pub ns: String,
    dir: PathBuf,
    daemon: Child,
    /// The URI that reaches this daemon (`qemu:///system` over the test's own socket).
    pub uri: String,
    domains: Vec<String>,
    /// The host's end of a link into the namespace's bridge, if one was made.
    uplink: Option<String>,
}

/// The libvirt and QEMU configuration: QEMU runs as root without cgroups, namespaces or a
/// security driver (there is no systemd to delegate cgroups), and writes its own logs, so
/// no virtlogd is needed.
const QEMU_CONF: &str = "user = \"root\"\ngroup = \"root\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nsecurity_driver = \"none\"\nstdio_handler = \"file\"\nremember_owner = 0\n";

impl Libvirt {
    /// Starts a libvirtd in `dir`, on a namespace whose bridge `br0` holds `bridge_cidr`.
    pub fn start(dir: &Path, bridge_cidr: &str) -> Libvirt {
        let ns = format!("mintlv-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        crate::testbed::sh(&["ip", "netns", "add", &ns]);
        for args in [
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", bridge_cidr, "dev", "br0"],
            vec!["link", "set", "br0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["ip", "-n", &ns];
            full.extend(args);
            crate::testbed::sh(&full);
        }
        let sub = |name: &str| {
            let p = dir.join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (etc, lib, log, cache, run, sock) = (
            sub("etc"),
            sub("lib"),
            sub("log"),
            sub("cache"),
            sub("run"),
            sub("sock"),
        );
        sub("pool");
        std::fs::write(etc.join("qemu.conf"), QEMU_CONF).unwrap();
        std::fs::write(
            etc.join("libvirtd.conf"),
            format!("unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nunix_sock_ro_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n", sock.display()),
        )
        .unwrap();
        // The machine's libvirt directories are replaced by the test's, in this mount
        // namespace only; a directory the machine lacks is made (empty) to mount over.
        let mounts: String = [
            (&etc, "/etc/libvirt"),
            (&lib, "/var/lib/libvirt"),
            (&log, "/var/log/libvirt"),
            (&cache, "/var/cache/libvirt"),
            (&run, "/run/libvirt"),
        ]
        .iter()
        .map(|(from, to)| format!("mkdir -p {to} && mount --bind {} {to} && ", from.display()))
        .collect();
        let daemon = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
            ])
            .arg(format!("{mounts}exec libvirtd"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("libvirtd.log")).unwrap())
            .spawn()
            .expect("start libvirtd");
        let uri = format!(
            "qemu:///system?socket={}",
            sock.join("libvirt-sock").display()
        );
        let mut lv = Libvirt {
            ns,
            dir: dir.to_path_buf(),
            daemon,
            uri,
            domains: Vec::new(),
            uplink: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while lv.try_virsh(&["version"]).is_err() {
            if let Ok(Some(exit)) = lv.daemon.try_wait() {
                panic!(
                    "libvirtd exited ({exit}): {}",
                    std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer within 30 s: {}",
                std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // sushy-tools uploads virtual media into the `default` pool.
        let pool = dir.join("pool");
        lv.virsh(&[
            "pool-define-as",
            "default",
            "dir",
            "--target",
            pool.to_str().unwrap(),
        ]);
        lv.virsh(&["pool-start", "default"]);
        lv
    }

    /// Links the host to the namespace's bridge with a veth pair whose host end holds
    /// `host_cidr`, so guests reach a daemon on the host (and the host reaches them).
    pub fn link_host(&mut self, host_cidr: &str) {
        let host = format!("mlvh{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &host]).output();
        crate::testbed::sh(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", "uplink", "netns", &self.ns,
        ]);
        self.uplink = Some(host.clone());
        crate::testbed::sh(&[
            "ip", "-n", &self.ns, "link", "set", "uplink", "master", "br0", "up",
        ]);
        crate::testbed::sh(&["ip", "addr", "add", host_cidr, "dev", &host]);
        crate::testbed::sh(&["ip", "link", "set", &host, "up"]);
    }

    /// `virsh ARGS` against this daemon: its output, or why it failed.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// `virsh ARGS`, which must succeed.
    pub fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args)
            .unwrap_or_else(|e| panic!("virsh {args:?}: {e}"))
    }

    /// Defines (does not start) a TCG domain `name` with `uuid`: 1 GiB, one vCPU, an empty
    /// raw disk of `disk_gib` on virtio, an empty CD on IDE, an empty floppy, a virtio NIC
    /// with `mac` on the bridge and its serial console in a file. Returns the console's path.
    pub fn define(&mut self, name: &str, uuid: &str, mac: &str, disk_gib: u64) -> PathBuf {
        self.define_with(name, uuid, mac, disk_gib, 1024)
    }

    /// As [`Libvirt::define`], with `memory_mib` of memory (a network-booted instance
    /// runs from memory).
    pub fn define_with(
        &mut self,
        name: &str,
        uuid: &str,
        mac: &str,
        disk_gib: u64,
        memory_mib: u64,
    ) -> PathBuf {
        let disk = self.dir.join(format!("{name}.raw"));
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(disk_gib << 30).unwrap();
        let serial = self.dir.join(format!("{name}.serial"));
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type='file' device='floppy'><driver name='qemu' type='raw'/><target dev='fda' bus='fdc'/></disk>
    <interface type='bridge'><source bridge='br0'/><mac address='{mac}'/><model type='virtio'/></interface>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
  </devices>
</domain>",
            disk = disk.display(),
            serial = serial.display(),
        );
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        self.virsh(&["define", file.to_str().unwrap()]);
        self.domains.push(name.to_string());
        serial
    }

    /// The domain's state as libvirt sees it (`running`, `shut off`, ...).
    pub fn state(&self, name: &str) -> String {
        self.virsh(&["domstate", name]).trim().to_string()
    }

    /// The domain's definition as libvirt holds it now.
    pub fn xml(&self, name: &str) -> String {
        self.virsh(&["dumpxml", name])
    }

    /// `GET http://{address}/` from inside the namespace, if it answers.
    pub fn get(&self, address: &str) -> Option<String> {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-s",
                "-m",
                "2",
                &format!("http://{address}/"),
            ])
            .output()
            .ok()?;
        (o.status.success() && !o.stdout.is_empty())
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = self.try_virsh(&["destroy", d]);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.daemon.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.daemon.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        if let Some(host) = &self.uplink {
            let _ = Command::new("ip").args(["link", "del", host]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A bare-metal lab: a libvirtd with one domain, sushy-tools' libvirt backend as its BMC,
/// and a daemon that knows the domain as a node, with a tier of the `redfish` driver on
/// the domain's bridge (198.18.9.0/24).
pub struct RedfishLab {
    // Dropped in this order: the daemon before the BMC it drives, libvirtd last.
    pub daemon: crate::running::Daemon,
    /// The emulator, held for its process's lifetime.
    #[allow(dead_code)]
    pub bmc: crate::bmc::Emulator,
    pub lv: Libvirt,
    /// The domain's (and node's) name.
    pub name: String,
    /// The domain's serial console.
    pub serial: PathBuf,
}

impl RedfishLab {
    /// Starts the lab in `dir`: domain `name` (`uuid`, `mac`, a 2 GiB disk), and a daemon
    /// started with `daemon_args`. With `uplink`, the host is linked into the bridge at
    /// 198.18.9.253 (where a daemon serving guests listens).
    pub fn start(
        dir: &Path,
        name: &str,
        uuid: &str,
        mac: &str,
        uplink: bool,
        daemon_args: &[&str],
    ) -> RedfishLab {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut lv = Libvirt::start(&dir.join("libvirt"), "198.18.9.254/24");
        if uplink {
            lv.link_host("198.18.9.253/24");
        }
        let serial = lv.define(name, uuid, mac, 2);
        let bmc =
            crate::bmc::Emulator::libvirt(&repo, &dir.join("bmc"), &lv.uri, vec![uuid.to_string()]);
        let daemon = crate::running::Daemon::start(&dir.join("data"), daemon_args, &repo);
        daemon.mint(&[
            "node",
            "add",
            name,
            "--cpus",
            "1",
            "--memory-mib",
            "1024",
            "--property",
            &format!("bmc-url={}", bmc.system_url(0)),
        ]);
        RedfishLab {
            daemon,
            bmc,
            lv,
            name: name.to_string(),
            serial,
        }
    }

    /// Imports `master` and creates tier `tier` of the `redfish` driver on the bridge's
    /// subnet (the host's and bridge's addresses reserved); the image record.
    pub fn tier(&self, master: &Path, tier: &str) -> serde_json::Value {
        let image = self
            .daemon
            .mint(&["image", "import", master.to_str().unwrap()]);
        let spec = serde_json::json!({
            "name": tier, "image": image["digest"], "max-instances": 3, "subnet": "198.18.9.0/24",
            "reserved": ["198.18.9.250-198.18.9.254"], "hostname": format!("{tier}-{{index}}"),
            "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "redfish"}, "deploy-timeout-secs": 900,
        });
        let file = self.lv.dir.join(format!("{tier}.json"));
        std::fs::write(&file, spec.to_string()).unwrap();
        self.daemon
            .mint(&["tier", "create", "-f", file.to_str().unwrap()]);
        image
    }

    /// Waits until `address` answers HTTP (from the bridge's namespace), for at most
    /// `limit`; the answer. A failure says libvirt's state and the console's end.
    pub fn wait_answer(&self, address: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(a) = self.lv.get(address) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{address} did not answer within {limit:?}; libvirt says {}; the console ends:\n{}",
                self.lv.state(&self.name),
                std::fs::read_to_string(&self.serial)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Scales `tier` to 0 and waits until libvirt sees the domain shut off.
    pub fn scale_in(&self, tier: &str) {
        self.daemon.mint(&["tier", "scale", tier, "0"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.lv.state(&self.name) != "shut off" {
            assert!(
                Instant::now() < deadline,
                "{} is still {}",
                self.name,
                self.lv.state(&self.name)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The images on the domain's `device` (`cdrom`, `floppy`) as libvirt holds them.
    pub fn inserted(&self, device: &str) -> Vec<String> {
        let xml = self.lv.xml(&self.name);
        xml.split("<disk ")
            .filter(|d| d.contains(&format!("device='{device}'")))
            .filter_map(|d| {
                d.split("<source file='")
                    .nth(1)
                    .map(|s| s.split('\'').next().unwrap_or("").to_string())
            })
            .collect()
    }
}
