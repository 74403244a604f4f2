//! The boot stage's job (`mint-agent boot`, run by `/init` of mint's boot stage on a
//! network-booted node): bring up the instance's address on the NIC the node booted from,
//! fetch the instance's parts (the master's tar and the instance's layer) by the
//! capability on the kernel command line, check each against its digest while unpacking
//! it into the root `/init` mounted in memory, and tell the engine. `/init` then
//! `switch_root`s into the instance: the layers already hold its identity, so nothing more
//! is applied here.

use anyhow::{Context as _, bail};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::write_disk::{absolute, get, ip, report, trusted_client, uptime_ms};

#[derive(clap::Args)]
pub struct BootArgs {
    /// Where to unpack the instance (a tmpfs `/init` mounted).
    #[arg(long)]
    root: PathBuf,
    /// The kernel command line to read (`/proc/cmdline`; a file for tests).
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
}

/// What the engine's boot script put on the kernel command line.
#[derive(Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// The deployment's descriptor, by capability URL.
    pub descriptor: String,
    /// The engine certificate's pin, for an https:// engine.
    pub pin: Option<String>,
    /// A CA file (in the boot stage, from the engine's trust archive) to check the engine's
    /// and a blob cache's certificates against instead of the pin.
    pub ca: Option<String>,
    /// The MAC of the NIC the node booted from, which gets the address.
    pub mac: String,
    /// The instance's address with its prefix length (`198.18.5.1/24`).
    pub address: String,
    /// The default gateway, if any.
    pub gateway: Option<String>,
}

impl BootConfig {
    /// Reads the `mint.*` parameters of a kernel command line.
    pub fn parse(cmdline: &str) -> anyhow::Result<BootConfig> {
        let value = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        let need = |key: &str| {
            value(key).with_context(|| {
                format!("the kernel command line has no {key}=; boot this node from the engine's /v1/boot script")
            })
        };
        Ok(BootConfig {
            descriptor: need("mint.descriptor")?,
            pin: value("mint.pin"),
            ca: value("mint.ca"),
            mac: need("mint.mac")?.to_ascii_lowercase(),
            address: need("mint.addr")?,
            gateway: value("mint.gw"),
        })
    }
}

/// What the boot stage tells the engine.
#[derive(Debug, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Outcome {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Bytes fetched (master and layer).
    bytes: u64,
    /// The machine's uptime when the boot stage started.
    booted_ms: u64,
    /// Fetching, checking and unpacking the parts (streamed together).
    fetch_unpack_ms: u64,
}

/// The interface whose MAC is `mac`, waiting up to 30 s for its driver to bind.
fn interface_of(mac: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in std::fs::read_dir("/sys/class/net")?.flatten() {
            let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
            if addr.trim().eq_ignore_ascii_case(mac) {
                return Ok(e.file_name().to_string_lossy().into_owned());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no interface has MAC {mac}: the master's kernel may lack this NIC's driver (add it to [netboot] modules)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Fetches the descriptor's tree parts and unpacks them into `root`, each checked.
fn fetch(
    http: &ureq::Agent,
    config: &BootConfig,
    root: &Path,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let desc: serde_json::Value = get(http, &config.descriptor)?
        .into_json()
        .context("the descriptor is not JSON")?;
    if desc["format"] != "tree" {
        bail!(
            "the instance's format is {}; the boot stage boots tree masters (disk masters are written by the deploy ISO)",
            desc["format"]
        );
    }
    let parts = desc["parts"]
        .as_array()
        .context("the descriptor has no parts")?;
    let started = Instant::now();
    for role in ["master", "layer"] {
        let part = parts
            .iter()
            .find(|p| p["role"] == role)
            .with_context(|| format!("the descriptor has no {role}"))?;
        let url = absolute(&config.descriptor, part["url"].as_str().unwrap_or_default());
        let (size, digest) = (
            part["size"].as_u64().unwrap_or(0),
            part["digest"].as_str().unwrap_or_default(),
        );
        let mut body = Hashing {
            inner: get(http, &url)?.into_reader(),
            hash: <sha2::Sha256 as sha2::Digest>::new(),
            bytes: 0,
        };
        // The master is a plain tree; the layer's whiteouts remove what it names.
        let whiteouts = if role == "master" {
            mint_layers::Whiteouts::Keep
        } else {
            mint_layers::Whiteouts::Apply
        };
        let unpacked = mint_layers::unpack(&mut body, root, whiteouts)
            .with_context(|| format!("unpacking the {role}"))?;
        std::io::copy(&mut body, &mut std::io::sink())
            .with_context(|| format!("reading the {role}"))?;
        let got = format!("sha256:{}", hex::encode(sha2::Digest::finalize(body.hash)));
        outcome.bytes += body.bytes;
        if body.bytes != size || got != digest {
            bail!(
                "the {role} arrived as {} bytes with digest {got}, not {size} bytes with {digest}",
                body.bytes
            );
        }
        for w in &unpacked.warnings {
            eprintln!("mint-agent: {role}: {w}");
        }
        eprintln!(
            "mint-agent: {role} unpacked: {} entries, {} bytes, digest checked",
            unpacked.entries, body.bytes
        );
    }
    outcome.fetch_unpack_ms = started.elapsed().as_millis() as u64;
    if !exists_in(root, "/sbin/init") {
        bail!("the instance has no /sbin/init to switch to");
    }
    Ok(())
}

/// Whether `path` names a file inside `root`, following symbolic links as the instance will
/// once it is `/` (an absolute link target is the instance's, not this system's).
fn exists_in(root: &Path, path: &str) -> bool {
    let mut parts: Vec<String> = Vec::new();
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let mut hops = 0;
    while let Some(p) = todo.pop() {
        match p.as_str() {
            "" | "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let at = root.join(parts.join("/")).join(&p);
        match std::fs::read_link(&at) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return false;
                }
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    parts.clear();
                }
                todo.extend(t.split('/').rev().map(str::to_string));
            }
            Err(_) if at.symlink_metadata().is_ok() => parts.push(p),
            Err(_) => return false,
        }
    }
    root.join(parts.join("/")).is_file()
}

/// `mint-agent boot`.
pub fn run(args: BootArgs) -> anyhow::Result<()> {
    let mut outcome = Outcome {
        booted_ms: uptime_ms(),
        ..Outcome::default()
    };
    let text = std::fs::read_to_string(&args.cmdline)
        .with_context(|| format!("reading {}", args.cmdline.display()))?;
    let config = BootConfig::parse(&text)?;
    let http = trusted_client(
        config.ca.as_deref().map(Path::new),
        config.pin.as_deref(),
        &config.descriptor,
    )?;
    let interface = interface_of(&config.mac)?;
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "set", &interface, "up"])?;
    ip(&["addr", "add", &config.address, "dev", &interface])?;
    if let Some(gw) = &config.gateway {
        ip(&["route", "add", "default", "via", gw])?;
    }
    eprintln!(
        "mint-agent: boot stage up {} ms after power-on, at {} on {interface}",
        outcome.booted_ms, config.address
    );
    let result = fetch(&http, &config, &args.root, &mut outcome);
    if let Err(e) = &result {
        outcome.error = Some(format!("{e:#}"));
    }
    outcome.ok = result.is_ok();
    eprintln!("mint-agent: {outcome:?}");
    let url = format!("{}/booted", config.descriptor.trim_end_matches('/'));
    if !report(&http, &url, &outcome, 10) {
        eprintln!("mint-agent: the engine could not be told how the boot went");
    }
    // The address goes with the instance, which brings it up again its own way.
    let _ = ip(&["addr", "flush", "dev", &interface]);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_found_through_the_instances_own_links() {
        let root = std::env::temp_dir().join(format!("mint-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        // An absolute target is the instance's own path, never this system's.
        std::os::unix::fs::symlink("/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
        assert!(exists_in(&root, "/sbin/init"));
        std::os::unix::fs::symlink("/lib/nothing", root.join("usr/sbin/halt")).unwrap();
        assert!(!exists_in(&root, "/sbin/halt"));
        assert!(!exists_in(&root, "/sbin/absent"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_command_line_names_what_is_missing() {
        let c = BootConfig::parse(
            "console=ttyS0 mint.descriptor=https://e:7600/v1/cap/web/0/x mint.pin=sha256:ab mint.mac=52:54:00:AA:00:01 mint.addr=198.18.5.1/24 quiet",
        )
        .unwrap();
        assert_eq!(c.mac, "52:54:00:aa:00:01");
        assert_eq!(c.address, "198.18.5.1/24");
        assert_eq!(c.pin.as_deref(), Some("sha256:ab"));
        assert_eq!(c.gateway, None);
        assert_eq!(c.ca, None);
        let c = BootConfig::parse(
            "mint.descriptor=https://e/v1/cap/web/0/x mint.ca=/etc/mint/ca.pem mint.mac=a mint.addr=198.18.5.1/24",
        )
        .unwrap();
        assert_eq!(c.ca.as_deref(), Some("/etc/mint/ca.pem"));
        let e = BootConfig::parse("mint.descriptor=x mint.mac=y").unwrap_err();
        assert!(e.to_string().contains("mint.addr="), "{e}");
    }
}
