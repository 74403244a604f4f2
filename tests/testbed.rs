//! A test bed of real nodes, shared by the node tests and the scale-out benchmark: a
//! bridge, network namespaces with a `mint-agent` in each, and a daemon on the host.
//!
//! Needs root (network namespaces, veth pairs, a bridge); these machines run tests as
//! root. Every address is in 198.18.0.0/15: the bridge 198.18.0.1/16, agents 198.18.1.x,
//! instances 198.18.2.x. The bed is torn down when dropped, also when a test fails, and
//! only one exists at a time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The host end of node `i`'s veth pair.
fn veth_name(i: usize) -> String {
    format!("mv{}-{i}", std::process::id() % 100_000)
}

/// Runs a command that must succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge, namespaces with an agent each, and a daemon, removed on drop.
pub struct TestBed {
    _one: std::sync::MutexGuard<'static, ()>,
    bridge: String,
    /// The nodes' namespaces, by node index.
    pub namespaces: Vec<String>,
    /// The agents, by node index.
    pub agents: Vec<Child>,
    daemon: Option<Child>,
    /// The daemon's URL.
    pub url: String,
    /// The bed's working directory.
    pub dir: PathBuf,
    repo: PathBuf,
    /// How the daemon gets its certificate (`--tls-self-signed`, or files from a CA).
    daemon_tls: Vec<String>,
    /// How agents trust the daemon (`--ca FILE`); empty: by its pin.
    agent_trust: Vec<String>,
    /// Further arguments of every agent.
    agent_args: Vec<String>,
    /// The other daemons of a bed of several on one shared store, as daemons 1, 2, ...
    peers: Vec<Peer>,
    /// The arguments every daemon of the bed starts with.
    daemon_args: Vec<String>,
}

/// A daemon beside the first, in a bed of several.
struct Peer {
    child: Option<Child>,
    /// Where it listens, `198.18.0.1:PORT`, kept across restarts.
    listen: String,
    data: PathBuf,
}

/// One test bed at a time: they share the bridge's address range.
static BEDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the test beds off while a test that is not one runs something as heavy (VMs under
/// TCG take both cores): the beds' timings assume the machine is theirs.
#[allow(dead_code)] // The tests use it; the benchmarks that share this file do not.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    BEDS.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for TestBed {
    fn drop(&mut self) {
        // Instance services outlive their agents by design; stop everything in the namespaces.
        for ns in &self.namespaces {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        for a in &mut self.agents {
            let _ = Command::new("kill")
                .args(["-TERM", &a.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for a in &mut self.agents {
            while Instant::now() < deadline && matches!(a.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        if let Some(d) = &mut self.daemon {
            let _ = d.kill();
            let _ = d.wait();
        }
        for p in &mut self.peers {
            if let Some(c) = &mut p.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            // Deleting the host end removes the pair at once; a namespace's own cleanup
            // happens later, in the kernel's time, and the next bed reuses the names.
            let _ = Command::new("ip")
                .args(["link", "del", &veth_name(i)])
                .output();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

impl TestBed {
    /// A bed of `nodes` namespaces with an agent each and a daemon (started with
    /// `daemon_args`), working in `dir`; `repo` is where `mint` commands run.
    pub fn new(dir: PathBuf, repo: PathBuf, nodes: usize, daemon_args: &[&str]) -> TestBed {
        Self::build(dir, repo, nodes, daemon_args, None, &[], false, 1)
    }

    /// A bed of `daemons` daemons on one shared store (`daemon_args` names it) with
    /// certificates from `ca`, whose agents know every daemon's URL. The first daemon is
    /// started alone and leads before the others start, so its data directory holds the
    /// admin token.
    #[allow(dead_code)]
    pub fn cluster(
        dir: PathBuf,
        repo: PathBuf,
        nodes: usize,
        daemons: usize,
        daemon_args: &[&str],
        ca: &TestCa,
    ) -> TestBed {
        Self::build(dir, repo, nodes, daemon_args, Some(ca), &[], false, daemons)
    }

    /// A bed of VM host slots: in each namespace a bridge `br0` holds the node's link (and
    /// its address), and the agent (`--vm`) boots its disk instance as a QEMU guest on a tap
    /// of that bridge, so a guest is on the bed's segment like a machine of its own.
    #[allow(dead_code)] // The VM tests use it; the benchmarks that share this file do not.
    pub fn vm_hosts(dir: PathBuf, repo: PathBuf, nodes: usize, daemon_args: &[&str]) -> TestBed {
        Self::build(
            dir,
            repo,
            nodes,
            daemon_args,
            None,
            &["--vm", "--vm-bridge", "br0", "--vm-memory-mib", "1024"],
            true,
            1,
        )
    }

    /// A bed whose agents start with `agent_args` besides the bed's own.
    pub fn with_agent_args(
        dir: PathBuf,
        repo: PathBuf,
        nodes: usize,
        daemon_args: &[&str],
        agent_args: &[&str],
    ) -> TestBed {
        Self::build(dir, repo, nodes, daemon_args, None, agent_args, false, 1)
    }

    /// A bed whose daemon presents a certificate `ca` issued (for the bridge's address and
    /// [`ENGINE_NAME`]) and whose agents trust `ca`, so that they also trust other servers
    /// it issued for, such as an HTTP cache in front of the daemon.
    pub fn with_ca(
        dir: PathBuf,
        repo: PathBuf,
        nodes: usize,
        daemon_args: &[&str],
        ca: &TestCa,
    ) -> TestBed {
        Self::build(dir, repo, nodes, daemon_args, Some(ca), &[], false, 1)
    }

    fn build(
        dir: PathBuf,
        repo: PathBuf,
        nodes: usize,
        daemon_args: &[&str],
        ca: Option<&TestCa>,
        agent_args: &[&str],
        vm: bool,
        daemons: usize,
    ) -> TestBed {
        let one = BEDS.lock().unwrap_or_else(|p| p.into_inner());
        let (daemon_tls, agent_trust) = match ca {
            None => (vec!["--tls-self-signed".to_string()], Vec::new()),
            Some(ca) => {
                let (cert, key) = ca.issue(&dir, "engine", &["198.18.0.1", ENGINE_NAME]);
                let files = vec![
                    "--tls-cert".into(),
                    cert.display().to_string(),
                    "--tls-key".into(),
                    key.display().to_string(),
                ];
                (files, vec!["--ca".into(), ca.cert.display().to_string()])
            }
        };
        let id = std::process::id() % 100_000;
        let mut bed = TestBed {
            _one: one,
            bridge: format!("mintbr{id}"),
            namespaces: Vec::new(),
            agents: Vec::new(),
            daemon: None,
            url: String::new(),
            dir,
            repo,
            daemon_tls,
            agent_trust,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            peers: Vec::new(),
            daemon_args: daemon_args.iter().map(|a| a.to_string()).collect(),
        };
        // A bed left by a killed run of this process id would be in the way.
        let _ = Command::new("ip")
            .args(["link", "del", &bed.bridge])
            .output();
        sh(&["ip", "link", "add", &bed.bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", "198.18.0.1/16", "dev", &bed.bridge]);
        sh(&["ip", "link", "set", &bed.bridge, "up"]);
        for i in 0..nodes {
            let ns = format!("mint-{id}-{i}");
            let veth = veth_name(i);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = Command::new("ip").args(["link", "del", &veth]).output();
            sh(&["ip", "netns", "add", &ns]);
            bed.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &veth, "master", &bed.bridge, "up"]);
            let link = if vm {
                sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"]);
                sh(&["ip", "-n", &ns, "link", "set", "eth0", "master", "br0"]);
                sh(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
                "br0"
            } else {
                "eth0"
            };
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.18.1.{}/16", 10 + i),
                "dev",
                link,
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        bed.start_daemon(daemon_args);
        if daemons > 1 {
            bed.wait_for("the first daemon to lead", Duration::from_secs(30), || {
                (bed.leader() == Some(0)).then_some(())
            });
            for i in 1..daemons {
                let data = bed.dir.join(format!("data-{i}"));
                bed.peers.push(Peer {
                    child: None,
                    listen: "198.18.0.1:0".into(),
                    data,
                });
                bed.start_peer(i);
            }
        }
        for i in 0..nodes {
            let agent = bed.start_agent(i);
            bed.agents.push(agent);
        }
        bed
    }

    /// Kills the daemon (SIGKILL, as a crash) and starts it again on the same address and
    /// state, where the agents find it.
    pub fn crash_and_restart_daemon(&mut self, extra: &[&str]) {
        if let Some(d) = &mut self.daemon {
            let _ = d.kill();
            let _ = d.wait();
        }
        let listen = self.url.trim_start_matches("https://").to_string();
        self.start_daemon_on(&listen, extra);
    }

    fn start_daemon(&mut self, extra: &[&str]) {
        self.start_daemon_on("198.18.0.1:0", extra);
    }

    fn start_daemon_on(&mut self, listen: &str, extra: &[&str]) {
        let (child, url) = self.spawn_daemon(listen, &self.dir.join("data"), extra, 0);
        self.daemon = Some(child);
        self.url = url;
    }

    /// Starts peer daemon `i` (1, 2, ...) on its address and data.
    fn start_peer(&mut self, i: usize) {
        let p = &self.peers[i - 1];
        let args = self.daemon_args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, url) = self.spawn_daemon(&p.listen.clone(), &p.data.clone(), &args, i);
        let p = &mut self.peers[i - 1];
        p.child = Some(child);
        p.listen = url.trim_start_matches("https://").to_string();
    }

    /// Every daemon's URL, the first daemon's first.
    #[allow(dead_code)]
    pub fn daemon_urls(&self) -> Vec<String> {
        std::iter::once(self.url.clone())
            .chain(self.peers.iter().map(|p| format!("https://{}", p.listen)))
            .collect()
    }

    /// Which daemon leads, by its health (none if no daemon says it leads).
    #[allow(dead_code)]
    pub fn leader(&self) -> Option<usize> {
        let http = self.http();
        self.daemon_urls().iter().position(|u| {
            http.get(&format!("{u}/v1/health"))
                .timeout(Duration::from_millis(500))
                .call()
                .ok()
                .and_then(|r| r.into_json::<serde_json::Value>().ok())
                .is_some_and(|v| v["role"]["leads"] == true)
        })
    }

    /// Daemon `i`'s process id, if it runs.
    #[allow(dead_code)]
    pub fn pid_of(&self, i: usize) -> Option<u32> {
        if i == 0 {
            self.daemon.as_ref().map(|c| c.id())
        } else {
            self.peers[i - 1].child.as_ref().map(|c| c.id())
        }
    }

    /// Sends daemon `i` a signal (`-STOP`, `-CONT`).
    #[allow(dead_code)]
    pub fn signal(&self, i: usize, signal: &str) {
        if let Some(pid) = self.pid_of(i) {
            sh(&["kill", signal, &pid.to_string()]);
        }
    }

    /// Kills daemon `i` (SIGKILL, as a crash).
    #[allow(dead_code)]
    pub fn kill_daemon(&mut self, i: usize) {
        let child = if i == 0 {
            self.daemon.as_mut()
        } else {
            self.peers[i - 1].child.as_mut()
        };
        if let Some(c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if i == 0 {
            self.daemon = None;
        } else {
            self.peers[i - 1].child = None;
        }
    }

    /// Starts daemon `i` again on its address and data, with the bed's arguments.
    #[allow(dead_code)]
    pub fn restart_daemon(&mut self, i: usize) {
        self.kill_daemon(i);
        if i == 0 {
            let listen = self.url.trim_start_matches("https://").to_string();
            let args = self.daemon_args.clone();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.start_daemon_on(&listen, &args);
        } else {
            self.start_peer(i);
        }
    }

    fn spawn_daemon(
        &self,
        listen: &str,
        data: &Path,
        extra: &[&str],
        which: usize,
    ) -> (Child, String) {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(["daemon", "--listen", listen])
            .args(&self.daemon_tls)
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let echo = std::env::var_os("MINT_TESTBED_LOGS").is_some();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("daemon {which}: {line}");
                }
                if let Some(rest) = line.split("serving ").nth(1) {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the daemon says where it serves");
        (child, url)
    }

    /// Adds `cidr` to the bed's bridge, as the gateway of a tier on another subnet (its
    /// guests route their answers to the host through it).
    #[allow(dead_code)] // The VM benchmark uses it.
    pub fn add_bridge_address(&self, cidr: &str) {
        sh(&["ip", "addr", "add", cidr, "dev", &self.bridge]);
    }

    /// The daemon's process id (the boot-storm benchmark reads its peak RSS).
    #[allow(dead_code)]
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("a daemon").id()
    }

    /// The pin of the daemon's certificate, as it wrote it beside its admin token.
    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/server.pin"))
            .expect("the daemon's pin")
            .trim()
            .to_string()
    }

    /// The environment that points the `mint` CLI at the bed's daemon, as its admin.
    pub fn cli_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MINT_SERVER", self.url.clone()),
            ("MINT_PIN", self.pin()),
            ("MINT_TOKEN_FILE", self.token_file().display().to_string()),
        ]
    }

    /// An HTTP client trusting exactly the daemon's certificate.
    pub fn http(&self) -> ureq::Agent {
        pinned(&self.pin())
    }

    /// An HTTP client trusting exactly node `i`'s agent's certificate.
    pub fn agent_http(&self, i: usize) -> ureq::Agent {
        let pem = std::fs::read(self.dir.join(format!("node-{i}/tls/cert.pem")))
            .expect("the agent's certificate");
        let der = pem_to_der(&pem);
        pinned(&mint_tls::Pin::of_certificate(&der).unwrap().to_string())
    }

    /// The admin token file of the bed's daemon.
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("data/admin.token")
    }

    /// Enrolls node `i` (once) and returns the file holding its join token.
    fn join_token(&self, i: usize) -> PathBuf {
        let file = self.dir.join(format!("join-{i}"));
        if !file.exists() {
            let o = Command::new(env!("CARGO_BIN_EXE_mint"))
                .args(["node", "enroll", &format!("node-{i}"), "--output"])
                .arg(&file)
                .envs(self.cli_env())
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "mint node enroll: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        file
    }

    /// Starts node `i`'s agent (enrolled on first start; later it has its credential).
    pub fn start_agent(&self, i: usize) -> Child {
        let ns = &self.namespaces[i];
        let node_dir = self.dir.join(format!("node-{i}"));
        let join = self.join_token(i);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "--uts"])
            .arg(env!("CARGO_BIN_EXE_mint-agent"))
            .args([
                "run",
                "--engine",
                &self.daemon_urls().join(","),
                "--name",
                &format!("node-{i}"),
                "--listen",
                &format!("198.18.1.{}:7601", 10 + i),
            ])
            .args(if self.agent_trust.is_empty() {
                vec!["--pin".to_string(), self.pin()]
            } else {
                self.agent_trust.clone()
            })
            .arg("--root")
            .arg(&node_dir)
            .args([
                "--interface",
                "eth0",
                "--cpus",
                "4",
                "--memory-mib",
                "4096",
                "--heartbeat-ms",
                "300",
                "--set-hostname",
            ])
            .args(["--label", &format!("zone=z{}", i % 3)])
            .args(&self.agent_args)
            .arg("--load-file")
            .arg(self.load_file(i))
            .arg("--join-token-file")
            .arg(&join)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("MINT_TESTBED_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start an agent");
        child
    }

    /// Node `i`'s own credential, which it presents to the engine (`Bearer ...`).
    pub fn node_auth(&self, i: usize) -> String {
        format!("Bearer {}", self.credential(i, "node"))
    }

    /// One of the credentials node `i`'s agent keeps (`node`: its own; `engine`: the
    /// engine's, for the agent's API).
    fn credential(&self, i: usize, which: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("node-{i}/credential")))
            .expect("the agent joined");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[which]
            .as_str()
            .unwrap_or_else(|| panic!("node-{i} keeps no `{which}` credential"))
            .to_string()
    }

    /// The credential the engine presents to node `i`'s agent, as the agent keeps it.
    pub fn engine_credential(&self, i: usize) -> String {
        self.credential(i, "engine")
    }

    /// The file node `i`'s agent reads its load from (per mille).
    fn load_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("load-{i}"))
    }

    /// Sets every node's reported load (per mille).
    pub fn set_load(&self, load: u32) {
        for i in 0..self.namespaces.len() {
            std::fs::write(self.load_file(i), load.to_string()).unwrap();
        }
    }

    /// Runs `mint ARGS --json` against the bed's daemon.
    pub fn mint(&self, args: &[&str]) -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(args)
            .arg("--json")
            .envs(self.cli_env())
            .current_dir(&self.repo)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mint {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Polls `probe` every 200 ms until it answers, for at most `limit`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The name, besides the bridge's address, in the certificate of a bed built
/// [`TestBed::with_ca`].
pub const ENGINE_NAME: &str = "engine.mint.test";

/// A certificate authority made for one test, which issues server certificates.
pub struct TestCa {
    /// Its certificate (PEM), for clients to trust.
    pub cert: PathBuf,
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mint test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = params.self_signed(&key).unwrap();
        let cert = dir.join("ca.pem");
        std::fs::write(&cert, issuer.pem()).unwrap();
        TestCa { cert, issuer, key }
    }

    /// A server certificate for `names` (addresses or DNS names), written as
    /// `dir/{what}.pem` and `dir/{what}.key`.
    pub fn issue(&self, dir: &Path, what: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, what);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{what}.pem")),
            dir.join(format!("{what}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An HTTP client that trusts exactly the certificate key with `pin`.
pub fn pinned(pin: &str) -> ureq::Agent {
    let trust =
        mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(pin.parse().expect("a pin"))).unwrap();
    ureq::AgentBuilder::new().tls_config(trust.config()).build()
}

/// The first certificate of a PEM file, as DER.
pub fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM")
}

/// The test master: a root with the `hello` service, which answers with the identity.
pub fn master(dir: &Path) -> PathBuf {
    let m = dir.join("master");
    std::fs::create_dir_all(m.join("etc/mint")).unwrap();
    std::fs::create_dir_all(m.join("usr/bin")).unwrap();
    std::fs::write(m.join("etc/hostname"), "debian\n").unwrap();
    std::fs::write(m.join("etc/hosts"), "127.0.0.1\tlocalhost\n").unwrap();
    std::fs::write(
        m.join("etc/mint/service"),
        "/usr/bin/mint-agent hello --port 80\n",
    )
    .unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_mint-agent"),
        m.join("usr/bin/mint-agent"),
    )
    .unwrap();
    // The service runs with the instance's root as `/`: the program's libraries and its
    // loader are the root's own.
    let ldd = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_mint-agent"))
        .output()
        .expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| {
            l.split("=>")
                .nth(1)
                .unwrap_or(l)
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        })
    {
        let to = m.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &to).unwrap();
    }
    m
}

/// The body of a GET, or none when nothing answers.
pub fn get(url: &str) -> Option<String> {
    ureq::get(url)
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_string()
        .ok()
}

/// Addresses on a namespace's eth0.
pub fn addresses_in(ns: &str) -> String {
    let o = Command::new("ip")
        .args(["-n", ns, "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fills `path` with `bytes` of data no compressor or deduplicator can shrink.
#[allow(dead_code)] // The benchmarks make large masters with it; the tests do not.
pub fn noise(path: &std::path::Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..bytes / buf.len() as u64 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}
