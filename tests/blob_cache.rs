//! Debian's nginx as the HTTP cache for blobs that `docs/blob-cache.md` describes, running
//! exactly `docs/blob-cache.nginx.conf`, for tests and benchmarks that put one in front of
//! the engine.

use crate::testbed::{ENGINE_NAME, TestCa};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's nginx serving `docs/blob-cache.nginx.conf` (its placeholders filled in) on the
/// address it is given, stopped when dropped.
pub struct Nginx {
    child: std::process::Child,
    prefix: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, which the master passes on to its workers; a SIGKILLed master would
        // leave them serving.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx in `prefix` listening on `listen` (`ADDRESS:PORT`), in front of the engine
    /// at `engine` (`ADDRESS:PORT`, its certificate from `ca` naming [`ENGINE_NAME`]); the
    /// cache's own certificate, from `ca`, names the listening address.
    pub fn start(prefix: &Path, listen: &str, engine: &str, ca: &TestCa) -> Nginx {
        assert!(
            Path::new("/usr/sbin/nginx").exists(),
            "Debian's nginx is missing: run `cargo xtask setup` (apt-get install nginx)"
        );
        std::fs::create_dir_all(prefix).unwrap();
        let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
        let (cert, key) = ca.issue(prefix, "cache", &[host]);
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/blob-cache.nginx.conf"),
        )
        .unwrap();
        let text = [
            ("@PREFIX@", prefix.display().to_string()),
            ("@CACHE_DIR@", prefix.join("cache").display().to_string()),
            ("@LISTEN@", listen.to_string()),
            ("@CERT@", cert.display().to_string()),
            ("@KEY@", key.display().to_string()),
            ("@ENGINE@", engine.to_string()),
            ("@ENGINE_NAME@", ENGINE_NAME.to_string()),
            ("@ENGINE_CA@", ca.cert.display().to_string()),
        ]
        .iter()
        .fold(template, |t, (k, v)| t.replace(k, v));
        let left: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.matches('@').count() >= 2)
            .collect();
        assert!(
            left.is_empty(),
            "placeholders left in the nginx configuration: {left:?}"
        );
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, text).unwrap();
        let check = Command::new("/usr/sbin/nginx")
            .arg("-t")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx {
            child,
            prefix: prefix.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {listen}: {}",
                std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// The GET requests nginx answered 200 for blob `digest`, by whichever URL.
    pub fn requests_for(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(self.prefix.join("access.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&format!("{digest} HTTP/1.1\" 200 ")))
            .count()
    }
}
