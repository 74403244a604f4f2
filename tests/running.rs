//! A `mint daemon` child process on an ephemeral loopback port, and the `mint` CLI run
//! against it: shared by the integration tests and the benchmarks that drive a real daemon.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts `mint daemon` with state in `data` and `extra` arguments (and `MINT_LOG` =
/// `log_level`), and returns the process, the URL it says it serves on, and everything it
/// writes to stderr, kept as it comes (the pipe is always drained, so it never blocks).
pub fn spawn_daemon(
    data: &Path,
    extra: &[&str],
    log_level: &str,
) -> (Child, String, Arc<Mutex<String>>) {
    // A listening address among the extra arguments replaces loopback's.
    let listen = if extra.contains(&"--listen") {
        &[][..]
    } else {
        &["--listen", "127.0.0.1:0"][..]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_mint"))
        .arg("daemon")
        .args(listen)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("MINT_LOG", log_level)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let stderr = child.stderr.take().expect("piped");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving ").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            if let Ok(mut l) = kept.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => (child, url, log),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "the daemon did not start: {}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            )
        }
    }
}

/// A daemon process, killed when dropped, with the CLI pointed at it.
pub struct Daemon {
    child: Child,
    /// Its URL.
    pub url: String,
    /// What it wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// Where `mint` commands run (relative paths in them are from here).
    pub cwd: PathBuf,
    /// Its data directory.
    pub data: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts one with state in `data` and `extra` daemon arguments; the daemon logs at
    /// `debug`, so tests can check what it never says.
    pub fn start(data: &Path, extra: &[&str], cwd: &Path) -> Daemon {
        let (child, url, log) = spawn_daemon(data, extra, "debug");
        Daemon {
            child,
            url,
            log,
            cwd: cwd.to_path_buf(),
            data: data.to_path_buf(),
        }
    }

    /// The daemon's process ID (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `mint --json ARGS` against the daemon.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mint"));
        c.arg("--json")
            .args(args)
            .env("MINT_SERVER", &self.url)
            .current_dir(&self.cwd);
        if let Some(pin) = self.pin() {
            c.env("MINT_PIN", pin);
        }
        // The CLI finds the admin token by itself only for a daemon on loopback.
        let on_loopback = ["://127.", "://localhost", "://[::1]"]
            .iter()
            .any(|l| self.url.contains(l));
        if !on_loopback {
            c.env("MINT_TOKEN_FILE", self.data.join("admin.token"));
        }
        c.output().expect("run mint")
    }

    /// The pin of the certificate the daemon serves, when it serves TLS.
    pub fn pin(&self) -> Option<String> {
        if !self.url.starts_with("https://") {
            return None;
        }
        std::fs::read_to_string(self.data.join("server.pin"))
            .ok()
            .map(|p| p.trim().to_string())
    }

    /// Runs a command that must succeed and parses its JSON output.
    pub fn mint(&self, args: &[&str]) -> Value {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "mint {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    /// Runs a command the daemon must refuse (exit code 1) and returns its message.
    pub fn refused(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "mint {args:?} should be refused: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
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
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {}",
                self.mint(&["events"])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The instances of `tier`.
    pub fn instances(&self, tier: &str) -> Vec<Value> {
        self.mint(&["instance", "list", tier])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Writes a small bootable ISO 9660 image (2 MiB): a primary volume descriptor, an El
/// Torito boot record and the terminator, which is all the engine checks of an ISO master.
/// Nothing boots from it; it stands for a live system where only BMCs that boot nothing
/// (sushy-tools' fake mode, the simulated BMCs) see it.
pub fn tiny_iso(path: &Path) {
    let mut img = vec![0u8; 2 << 20];
    for (i, kind) in [1u8, 0, 255].into_iter().enumerate() {
        let d = &mut img[(16 + i) * 2048..][..2048];
        d[0] = kind;
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        match kind {
            0 => d[7..30].copy_from_slice(b"EL TORITO SPECIFICATION"),
            1 => {
                d[80..84].copy_from_slice(&1024u32.to_le_bytes());
                d[128..130].copy_from_slice(&2048u16.to_le_bytes());
            }
            _ => {}
        }
    }
    std::fs::write(path, img).unwrap();
}
