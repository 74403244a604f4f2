//! `mint-agent write-disk`: the deploy system's one job. Booted from mint's deploy ISO on a
//! server's virtual CD, with its deployment's configuration on the virtual floppy, it
//! brings up the instance's own address (pre-assigned, so no other machine holds it),
//! fetches the instance's raw master by the deployment's capability URL (trusting the
//! engine's certificate by the pin the configuration carries), writes it to the server's
//! disk while hashing it, checks the digest, reports the outcome to the engine, and powers
//! the machine off: the `redfish` driver then boots it from its disk, with its seed.

use anyhow::{Context as _, bail};
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The deployment's configuration, `deploy.json` on the volume the engine serves as the
/// deployment's `deploy-config`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeployConfig {
    /// The deployment's descriptor, by capability URL.
    pub descriptor: String,
    /// Where the outcome is posted.
    pub report: String,
    /// The pin of the engine's certificate (`sha256:...`), for an https:// engine.
    #[serde(default)]
    pub pin: Option<String>,
    /// The instance's address and prefix length, which the deploy system borrows.
    pub address: String,
    pub prefix_len: u8,
    /// The default gateway, when the engine is not on the instance's subnet.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The disk to write (`/dev/sda`); by default the first fixed disk large enough.
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(clap::Args)]
pub struct WriteArgs {
    /// The deployment's configuration (`deploy.json`).
    #[arg(long)]
    config: PathBuf,
    /// The interface to bring the address up on (default: the first Ethernet interface).
    #[arg(long)]
    interface: Option<String>,
    /// Stay up after writing instead of powering the machine off.
    #[arg(long)]
    no_poweroff: bool,
}

/// What the deploy system tells the engine when it is done.
#[derive(Debug, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Outcome {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    target: String,
    bytes: u64,
    digest: String,
    /// The machine's uptime when the deploy system started: its boot.
    booted_ms: u64,
    /// Fetching and writing (streamed: the one waits for the other).
    fetch_write_ms: u64,
    /// Flushing the disk.
    sync_ms: u64,
}

pub(crate) fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The first Ethernet interface (type 1 in sysfs), by name.
fn first_ethernet() -> anyhow::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .context("no Ethernet interface: the deploy ISO's kernel may lack the NIC's driver")
}

/// A block device's size in bytes, from sysfs.
fn block_size(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 512
}

/// The first fixed, writable disk (by name) that holds `need` bytes.
fn pick_target(need: u64) -> anyhow::Result<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let flag = |n: &str, f: &str| {
        std::fs::read_to_string(format!("/sys/block/{n}/{f}")).is_ok_and(|t| t.trim() == "1")
    };
    let skip = ["loop", "ram", "sr", "fd", "dm-", "md", "zram"];
    let mut seen = Vec::new();
    for n in names
        .iter()
        .filter(|n| !skip.iter().any(|s| n.starts_with(s)))
    {
        if flag(n, "removable") || flag(n, "ro") {
            continue;
        }
        let size = block_size(n);
        if size >= need {
            return Ok(Path::new("/dev").join(n));
        }
        seen.push(format!("{n} ({size} bytes)"));
    }
    bail!(
        "no fixed disk holds the master's {need} bytes (disks: {}); give the node a bigger disk",
        if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        }
    )
}

/// Resolves a URL the descriptor gives against the descriptor's own.
pub(crate) fn absolute(base: &str, url: &str) -> String {
    if url.contains("://") {
        return url.into();
    }
    let start = base.find("://").map_or(0, |i| i + 3);
    let end = base[start..].find('/').map_or(base.len(), |i| start + i);
    format!("{}{url}", &base[..end])
}

/// GETs `url`, retrying for up to two minutes while the network comes up or the engine
/// cannot be reached.
pub(crate) fn get(http: &ureq::Agent, url: &str) -> anyhow::Result<ureq::Response> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match http.get(url).call() {
            Ok(r) => return Ok(r),
            Err(ureq::Error::Transport(e)) if Instant::now() < deadline => {
                eprintln!("mint-agent: {url}: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e).with_context(|| format!("GET {url}")),
        }
    }
}

/// Fetches the master and writes it to the disk.
fn write(http: &ureq::Agent, config: &DeployConfig, outcome: &mut Outcome) -> anyhow::Result<()> {
    let desc: serde_json::Value = get(http, &config.descriptor)?
        .into_json()
        .context("the descriptor is not JSON")?;
    let master = desc["parts"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["role"] == "master"))
        .context("the descriptor has no master")?;
    let name = master["name"].as_str().unwrap_or_default();
    if !name.ends_with(".raw") {
        bail!(
            "the master is `{name}`; the deploy system writes raw disks (convert with `qemu-img convert -O raw`)"
        );
    }
    let (size, digest) = (
        master["size"].as_u64().unwrap_or(0),
        master["digest"].as_str().unwrap_or_default().to_string(),
    );
    let target = match &config.target {
        Some(t) => PathBuf::from(t),
        None => pick_target(size)?,
    };
    outcome.target = target.display().to_string();
    let url = absolute(
        &config.descriptor,
        master["url"].as_str().unwrap_or_default(),
    );
    let started = Instant::now();
    let mut body = get(http, &url)?.into_reader();
    let mut disk = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .with_context(|| format!("opening {}", target.display()))?;
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = body.read(&mut buf).context("reading the master")?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hash, &buf[..n]);
        disk.write_all(&buf[..n])
            .with_context(|| format!("writing {}", target.display()))?;
        outcome.bytes += n as u64;
    }
    outcome.fetch_write_ms = started.elapsed().as_millis() as u64;
    let synced = Instant::now();
    disk.sync_all()
        .with_context(|| format!("flushing {}", target.display()))?;
    outcome.sync_ms = synced.elapsed().as_millis() as u64;
    outcome.digest = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hash)));
    if outcome.bytes != size || outcome.digest != digest {
        bail!(
            "the master arrived as {} bytes with digest {}, not {size} bytes with {digest}; the disk holds a damaged copy",
            outcome.bytes,
            outcome.digest
        );
    }
    Ok(())
}

/// POSTs `outcome` to `url`, trying `attempts` times a second apart; whether it arrived.
pub(crate) fn report(
    http: &ureq::Agent,
    url: &str,
    outcome: &impl serde::Serialize,
    attempts: u32,
) -> bool {
    for _ in 0..attempts {
        match http
            .post(url)
            .timeout(Duration::from_secs(10))
            .send_json(outcome)
        {
            Ok(_) => return true,
            Err(e) => eprintln!("mint-agent: reporting to the engine: {e}; retrying"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
}

/// A client for the engine (and a blob cache) at `url`: certificates checked against the CA
/// file `ca` if given, else by the engine's `pin` when it is https://. The deploy system and
/// the boot stage have no CA of their own: the engine hands them its pin, or a boot stage
/// the CA of `[netboot] ca`.
pub(crate) fn trusted_client(
    ca: Option<&Path>,
    pin: Option<&str>,
    url: &str,
) -> anyhow::Result<ureq::Agent> {
    let trust = mint_tls::Trust::from_flags(ca, pin, url).context("the engine's pin")?;
    Ok(match trust {
        Some(t) => stall_timeouts(ureq::AgentBuilder::new())
            .tls_config(
                mint_tls::ClientTrust::new(&t)
                    .with_context(|| format!("the engine's trust ({t})"))?
                    .config(),
            )
            .build(),
        None => stall_timeouts(ureq::AgentBuilder::new()).build(),
    })
}

/// Timeouts for the agent's clients that catch a stalled peer, never a slow one: a body of
/// gigabytes over a shared link can take many minutes, so no request has a deadline for
/// its whole body, and each read or write must make progress within its bound instead.
pub(crate) fn stall_timeouts(b: ureq::AgentBuilder) -> ureq::AgentBuilder {
    b.timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .timeout_write(Duration::from_secs(120))
}

/// `mint-agent write-disk`.
pub fn run(args: WriteArgs) -> anyhow::Result<()> {
    let mut outcome = Outcome {
        booted_ms: uptime_ms(),
        ..Outcome::default()
    };
    let text = std::fs::read(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config: DeployConfig = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a deploy configuration", args.config.display()))?;
    let http = trusted_client(None, config.pin.as_deref(), &config.descriptor)?;
    let interface = match &args.interface {
        Some(i) => i.clone(),
        None => first_ethernet()?,
    };
    ip(&["link", "set", &interface, "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/{}", config.address, config.prefix_len),
        "dev",
        &interface,
    ])?;
    if let Some(gw) = &config.gateway {
        ip(&["route", "add", "default", "via", gw])?;
    }
    eprintln!(
        "mint-agent: deploy system up {} ms after power-on, at {}/{} on {interface}",
        outcome.booted_ms, config.address, config.prefix_len
    );
    let result = write(&http, &config, &mut outcome);
    if let Err(e) = &result {
        outcome.error = Some(format!("{e:#}"));
    }
    outcome.ok = result.is_ok();
    eprintln!("mint-agent: {outcome:?}");
    let reported = report(&http, &config.report, &outcome, 30);
    if !args.no_poweroff {
        // SAFETY: sync takes no arguments; reboot with a documented command, as root.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    match (result, reported) {
        (Err(e), _) => Err(e),
        (Ok(()), false) => bail!("the disk is written but the engine could not be told"),
        (Ok(()), true) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_names_its_fields() {
        let c: DeployConfig = serde_json::from_str(r#"{"descriptor":"https://e/v1/cap/t/0/x","report":"https://e/v1/cap/t/0/x/written","address":"198.18.9.2","prefix-len":24}"#).unwrap();
        assert_eq!(
            (c.address.as_str(), c.prefix_len, c.target),
            ("198.18.9.2", 24, None)
        );
        let e = serde_json::from_str::<DeployConfig>(
            r#"{"descriptor":"x","report":"y","address":"a","prefix-len":24,"targett":"/dev/sda"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("targett"), "{e}");
        assert_eq!(
            absolute("https://e:7600/v1/cap/t/0/x", "/v1/cap/t/0/x/master"),
            "https://e:7600/v1/cap/t/0/x/master"
        );
    }
}
