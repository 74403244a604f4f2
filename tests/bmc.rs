//! BMCs for the redfish driver's tests and benchmark: OpenStack's sushy-tools Redfish
//! emulator in its fake-driver mode (real HTTP, real Redfish resources, systems that take
//! seconds to change power state), started on 127.0.0.1 from the Python environment that
//! `cargo xtask setup` makes, and a misbehaving BMC that fails in the ways real ones do.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Python environment with sushy-tools and componentize-py.
pub fn python_env(repo: &Path) -> PathBuf {
    let venv = repo.join("target/mint-py");
    assert!(
        venv.join("bin/sushy-emulator").exists(),
        "{} lacks sushy-emulator: run `cargo xtask setup` (it installs tests/python-requirements.txt)",
        venv.display()
    );
    venv
}

/// A free TCP port on 127.0.0.1 (the emulator binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One sushy-emulator process serving `systems` fake systems, killed on drop.
pub struct Emulator {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The systems' UUIDs, in order.
    pub systems: Vec<String>,
    /// User and password the emulator requires, if any.
    pub auth: Option<(String, String)>,
    log: PathBuf,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    /// Starts an emulator in `dir` with `systems` systems, all powered off, requiring
    /// `auth` (HTTP basic, checked against a bcrypt htpasswd file) when given. `tag`
    /// makes the systems' UUIDs unique across emulators.
    pub fn start(
        repo: &Path,
        dir: &Path,
        tag: u32,
        systems: usize,
        auth: Option<(&str, &str)>,
    ) -> Emulator {
        Emulator::start_with(repo, dir, tag, systems, auth, None)
    }

    /// [`Emulator::start`], serving HTTPS with the PEM certificate and key `tls` when given.
    pub fn start_with(
        repo: &Path,
        dir: &Path,
        tag: u32,
        systems: usize,
        auth: Option<(&str, &str)>,
        tls: Option<(&Path, &Path)>,
    ) -> Emulator {
        let venv = python_env(repo);
        std::fs::create_dir_all(dir).expect("emulator dir");
        let uuids: Vec<String> = (0..systems)
            .map(|i| format!("5a17e000-{tag:04x}-4000-8000-{:012x}", i + 1))
            .collect();
        let mut conf = String::from(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_FAKE_DRIVER = True\n",
        );
        conf.push_str(&format!(
            "SUSHY_EMULATOR_STATE_DIR = '{}'\n",
            dir.join("state").display()
        ));
        conf.push_str("SUSHY_EMULATOR_FAKE_SYSTEMS = [\n");
        for (i, u) in uuids.iter().enumerate() {
            conf.push_str(&format!(
                "  {{'uuid': '{u}', 'name': 'sys-{tag}-{i}', 'power_state': 'Off', 'nics': [{{'mac': '52:54:00:{:02x}:{:02x}:{:02x}', 'ip': '198.18.4.{}'}}]}},\n",
                tag & 0xff,
                i >> 8,
                i & 0xff,
                i % 250 + 1
            ));
        }
        conf.push_str("]\n");
        if let Some((user, password)) = auth {
            let hash = Command::new(venv.join("bin/python"))
                .args(["-c", "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())", password])
                .output()
                .expect("bcrypt");
            assert!(
                hash.status.success(),
                "{}",
                String::from_utf8_lossy(&hash.stderr)
            );
            let file = dir.join("htpasswd");
            std::fs::write(
                &file,
                format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
            )
            .expect("htpasswd");
            conf.push_str(&format!(
                "SUSHY_EMULATOR_AUTH_FILE = '{}'\n",
                file.display()
            ));
        }
        if let Some((cert, key)) = tls {
            conf.push_str(&format!(
                "SUSHY_EMULATOR_SSL_CERT = '{}'\nSUSHY_EMULATOR_SSL_KEY = '{}'\n",
                cert.display(),
                key.display()
            ));
        }
        Emulator::spawn(&venv, dir, conf, uuids, auth, tls, &["--fake"])
    }

    /// An emulator in `dir` whose systems are the libvirt domains `uuids` behind `uri`
    /// (sushy-tools' libvirt backend: power, boot device and virtual media act on the
    /// domains), uploading virtual media into libvirt's `default` storage pool.
    pub fn libvirt(repo: &Path, dir: &Path, uri: &str, uuids: Vec<String>) -> Emulator {
        let venv = python_env(repo);
        std::fs::create_dir_all(dir).expect("emulator dir");
        let mut conf = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LIBVIRT_URI = '{uri}'\n"
        );
        conf.push_str(&format!(
            "SUSHY_EMULATOR_STATE_DIR = '{}'\n",
            dir.join("state").display()
        ));
        // Only the test's own domains are systems of this BMC.
        conf.push_str(&format!("SUSHY_EMULATOR_ALLOWED_INSTANCES = {uuids:?}\n"));
        Emulator::spawn(&venv, dir, conf, uuids, None, None, &[])
    }

    fn spawn(
        venv: &Path,
        dir: &Path,
        conf: String,
        uuids: Vec<String>,
        auth: Option<(&str, &str)>,
        tls: Option<(&Path, &Path)>,
        mode: &[&str],
    ) -> Emulator {
        let config = dir.join("emulator.conf");
        std::fs::write(&config, conf).expect("emulator config");
        let log = dir.join("emulator.log");
        // A port taken between choosing it and binding it makes the emulator exit; try again.
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(venv.join("bin/sushy-emulator"))
                .args(mode)
                .arg("--config")
                .arg(&config)
                .args(["--port", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("emulator log"))
                .spawn()
                .expect("start sushy-emulator");
            let mut e = Emulator {
                child,
                base: format!(
                    "{}://127.0.0.1:{port}",
                    if tls.is_some() { "https" } else { "http" }
                ),
                systems: uuids.clone(),
                auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
                log: log.clone(),
            };
            if e.wait_ready(Duration::from_secs(30)) {
                return e;
            }
        }
        panic!(
            "sushy-emulator did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if self.get("/redfish/v1/").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The URL of system `i`, as a node's `bmc-url`.
    pub fn system_url(&self, i: usize) -> String {
        format!("{}/redfish/v1/Systems/{}", self.base, self.systems[i])
    }

    /// The emulator's own view of a resource (with its credentials), as JSON.
    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        // The test's own look at the emulator checks no certificate: it is not what is tested.
        let http = match self.base.starts_with("https://") {
            true => ureq::AgentBuilder::new()
                .tls_config(
                    mint_tls::ClientTrust::new(&mint_tls::Trust::Insecure)
                        .unwrap()
                        .config(),
                )
                .build(),
            false => ureq::AgentBuilder::new().build(),
        };
        let mut req = http
            .get(&format!("{}{path}", self.base))
            .timeout(Duration::from_secs(5));
        if let Some((u, p)) = &self.auth {
            use base64::Engine as _;
            req = req.set(
                "Authorization",
                &format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                ),
            );
        }
        req.call().ok()?.into_json().ok()
    }

    /// System `i`'s resource.
    pub fn system(&self, i: usize) -> serde_json::Value {
        self.get(&format!("/redfish/v1/Systems/{}", self.systems[i]))
            .expect("the emulator answers")
    }

    /// System `i`'s virtual-media device `device` (`Cd`, `Floppy`).
    pub fn media(&self, i: usize, device: &str) -> serde_json::Value {
        self.get(&format!(
            "/redfish/v1/Systems/{}/VirtualMedia/{device}",
            self.systems[i]
        ))
        .expect("the emulator answers")
    }

    /// The emulator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How a [`BadBmc`] misbehaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Misbehaviour {
    /// Answers every request with 500 and a Redfish error body.
    ServerError,
    /// Answers 200 with a body that is not JSON.
    Garbled,
    /// Accepts connections and never answers.
    Silent,
}

/// A BMC that fails every request in one way, on 127.0.0.1; stops when dropped.
pub struct BadBmc {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests received so far.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for BadBmc {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.base.trim_start_matches("http://"));
    }
}

impl BadBmc {
    /// Starts one.
    pub fn start(how: Misbehaviour) -> BadBmc {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 8192];
                let _ = conn.read(&mut buf);
                requests2.fetch_add(1, Ordering::Relaxed);
                let (status, body) = match how {
                    Misbehaviour::ServerError => (
                        "500 Internal Server Error",
                        r#"{"error":{"code":"Base.1.0.GeneralError","message":"the BMC's firmware is updating"}}"#,
                    ),
                    Misbehaviour::Garbled => ("200 OK", "<html>this is not Redfish"),
                    Misbehaviour::Silent => {
                        // Keep the connection open and say nothing.
                        held.push(conn);
                        continue;
                    }
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        BadBmc {
            base,
            stop,
            requests,
        }
    }
}
