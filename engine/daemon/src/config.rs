//! The daemon's configuration file (`mint.toml`): what the operator allows plugins (trusted
//! vendor keys, unsigned packages, outbound hosts per plugin), where BMC credentials are,
//! and how many driver calls run at once.
//!
//! ```toml
//! [plugins]
//! allow-unsigned = false
//! [plugins.trusted-keys]
//! acme = ["RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3"]
//! [plugins.grants]
//! acme-redfish = ["https://*.bmc.example.net"]
//!
//! [credentials]
//! file = "bmc-credentials.toml"   # relative to this file; or entries inline:
//! # [[credentials.credential]]
//! # endpoint = "https://10.1.0.17"
//! # username = "admin"
//! # password = "..."
//!
//! [drivers]
//! concurrency = 16                  # driver calls at once, all tiers together
//! per-endpoint = 4                  # calls at once to one BMC host or agent
//! health-check-secs = 5             # each running instance's health, on its own schedule
//!
//! [artifacts]
//! transfers = 64                    # blob transfers at once; more wait their turn
//! bandwidth-mbps = 0                # shared equally by the transfers; 0: no cap
//! scrub-hours = 24                  # every stored blob's digest checked again
//! # blob-base = "https://cache.example:8443"  # an HTTP cache fronting /v1/blobs (docs/blob-cache.md)
//!
//! [materialize]
//! root = "/srv/mint/materialized"   # relative to this file; absent: materialize is off
//!
//! [deploy]
//! iso = "deploy.iso"                # `cargo xtask deploy-iso`; BMCs boot it to write disk masters
//!
//! [netboot]                         # network boot (docs/netboot.md); absent: off
//! listen = "198.18.0.1:8081"        # plain HTTP for firmware: boot scripts, boot stage, kernels
//! stage = "boot-stage.cpio"         # `cargo xtask boot-stage`
//! cmdline = "console=ttyS0,115200"  # added to every node's kernel command line
//! # modules = ["virtio_net", "ixgbe"] # NIC drivers loaded from the master (default: common NICs)
//! # dnsmasq-hosts = "/var/lib/mint/dnsmasq.hosts"  # static leases the engine keeps current
//! # dnsmasq-pid-file = "/run/dnsmasq.pid"          # sent SIGHUP when they change
//! # check-source = true             # a script only to the instance's own address
//! # ca = "site-ca.pem"              # boot stages trust this CA, not the pin (a blob cache)
//!
//! [[endpoint]]                      # how BMCs' certificates are trusted
//! endpoint = "https://10.1.0.17"    # or node = "rack1-n03"; neither: every endpoint
//! tls = { pin = "sha256:..." }      # or { ca = "bmc-ca.pem" }, "system" (the default), "insecure"
//! ```

use mint_core::PluginPolicy;
use mint_plugins::package::Trust;
use mint_plugins::{Credentials, HostPattern};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    credentials: RawCredentials,
    #[serde(default)]
    drivers: RawDrivers,
    #[serde(default)]
    materialize: RawMaterialize,
    #[serde(default)]
    artifacts: RawArtifacts,
    #[serde(default)]
    deploy: RawDeploy,
    #[serde(default)]
    netboot: RawNetboot,
    #[serde(default)]
    endpoint: Vec<RawEndpoint>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNetboot {
    listen: Option<String>,
    url: Option<String>,
    stage: Option<PathBuf>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    modules: Vec<String>,
    dnsmasq_hosts: Option<PathBuf>,
    dnsmasq_pid_file: Option<PathBuf>,
    check_source: Option<bool>,
    ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    iso: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    node: Option<String>,
    endpoint: Option<String>,
    tls: toml::Value,
}

/// Reads an `[[endpoint]]` entry's `tls`; `base` places a relative CA file.
fn endpoint_trust(at: &str, value: &toml::Value, base: &Path) -> Result<mint_tls::Trust, String> {
    let fix = "write `tls = \"system\"`, `tls = \"insecure\"`, `tls = { ca = \"FILE\" }` or `tls = { pin = \"sha256:...\" }`";
    match value {
        toml::Value::String(s) if s == "system" => Ok(mint_tls::Trust::System),
        toml::Value::String(s) if s == "insecure" => Ok(mint_tls::Trust::Insecure),
        toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
            Some((k, toml::Value::String(v))) if k == "ca" => {
                let f = PathBuf::from(v);
                Ok(mint_tls::Trust::Ca(if f.is_relative() {
                    base.join(f)
                } else {
                    f
                }))
            }
            Some((k, toml::Value::String(v))) if k == "pin" => v
                .parse()
                .map(mint_tls::Trust::Pin)
                .map_err(|e| format!("{at}: field `tls.pin`: {e}")),
            _ => Err(format!("{at}: field `tls`: {fix}")),
        },
        _ => Err(format!("{at}: field `tls`: {fix}")),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMaterialize {
    root: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawPlugins {
    #[serde(default)]
    allow_unsigned: bool,
    #[serde(default)]
    trusted_keys: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    grants: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    file: Option<PathBuf>,
    /// Entries given inline, in the secrets file's form.
    #[serde(default)]
    credential: Vec<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "kebab-case")]
struct RawDrivers {
    concurrency: Option<usize>,
    per_endpoint: Option<usize>,
    health_check_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "kebab-case")]
struct RawArtifacts {
    transfers: Option<usize>,
    bandwidth_mbps: Option<u64>,
    scrub_hours: Option<u64>,
    blob_base: Option<String>,
}

/// Checks `[artifacts] blob-base`: an `https://` origin (nodes send it their credential),
/// optionally with a path prefix, without a query, fragment or user information. Returned
/// without a trailing slash, ready for `/v1/blobs/{digest}` to be appended.
fn blob_base(value: &str) -> Result<String, String> {
    let fix = "give the cache's origin, e.g. `blob-base = \"https://cache.example:8443\"`";
    let Some(rest) = value.strip_prefix("https://") else {
        return Err(format!(
            "`{value}` is not an https:// URL (nodes send the cache their credential, so it must be TLS); {fix}"
        ));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') || value.contains(['?', '#', ' ']) {
        return Err(format!(
            "`{value}` needs a host and no user, query, fragment or spaces; {fix}"
        ));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// The most driver calls at once the configuration may ask for.
pub const MAX_CONCURRENCY: usize = 256;

/// A checked configuration.
#[derive(Debug, Default)]
pub struct Config {
    /// Trust and grants for plugins.
    pub plugins: PluginPolicy,
    /// BMC and other node-endpoint credentials.
    pub credentials: Credentials,
    /// Driver calls at once, all tiers together.
    pub concurrency: usize,
    /// Driver calls at once to one endpoint.
    pub per_endpoint: usize,
    /// How often each running instance is health-checked.
    pub health_check: std::time::Duration,
    /// The directory `materialize` writes below; none turns it off.
    pub materialize_root: Option<PathBuf>,
    /// How node endpoints' certificates are trusted.
    pub endpoint_tls: mint_plugins::TlsPolicies,
    /// Blob transfers at once.
    pub transfers: usize,
    /// The cap all blob transfers share, in bytes per second (0: none).
    pub bandwidth: u64,
    /// How often every stored blob is checked again.
    pub scrub: std::time::Duration,
    /// The origin descriptors send nodes to for blobs (an HTTP cache in front of the
    /// engine); none: the engine itself.
    pub blob_base: Option<String>,
    /// The deploy ISO BMCs boot to write a disk master onto a server's disk (checked to be
    /// a bootable ISO); none: disk masters cannot be deployed through BMCs.
    pub deploy_iso: Option<PathBuf>,
    /// `[netboot]`.
    pub netboot: crate::netboot::Settings,
}

/// The default interval of blob scrubs.
pub const SCRUB_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Config {
    /// The configuration of a daemon started without a file: no trusted keys, unsigned
    /// packages refused, no grants, no credentials.
    pub fn default_for_daemon() -> Config {
        Config {
            concurrency: mint_core::DRIVER_CONCURRENCY,
            per_endpoint: mint_core::PER_ENDPOINT,
            health_check: mint_core::HEALTH_CHECK_EVERY,
            transfers: crate::delivery::TRANSFERS,
            scrub: SCRUB_EVERY,
            ..Config::default()
        }
    }

    /// Reads and checks `path`. Errors name the file and the field.
    pub fn read(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration {}: {e}", path.display()))?;
        Config::parse(path, &text)
    }

    /// Parses a configuration's text; `path` places relative file names and names errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, String> {
        let at = |m: String| format!("{}: {m}", path.display());
        let raw: Raw = toml::from_str(text).map_err(|e| at(e.message().trim_end().to_string()))?;
        let trust =
            Trust::new(&raw.plugins.trusted_keys, raw.plugins.allow_unsigned).map_err(at)?;
        let mut grants = BTreeMap::new();
        for (plugin, hosts) in raw.plugins.grants {
            let hosts = hosts
                .iter()
                .map(|h| {
                    HostPattern::parse(h).map_err(|m| at(format!("plugins.grants.{plugin}: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            grants.insert(plugin, hosts);
        }
        let credentials = match (raw.credentials.file, raw.credentials.credential) {
            (None, inline) if inline.is_empty() => Credentials::default(),
            (None, inline) => {
                // Checked by the same parser as a secrets file, so both read alike.
                let mut table = toml::Table::new();
                table.insert("credential".into(), toml::Value::Array(inline.into_iter().map(toml::Value::Table).collect()));
                Credentials::parse(&format!("{} [credentials]", path.display()), &table.to_string())?
            }
            (Some(f), inline) if inline.is_empty() => {
                let f = if f.is_relative() { path.parent().unwrap_or(Path::new(".")).join(f) } else { f };
                Credentials::read(&f).map_err(|m| at(format!("credentials.file: {m}")))?
            }
            (Some(_), _) => return Err(at("[credentials]: give `file` or inline `[[credentials.credential]]` entries, not both".into())),
        };
        let concurrency = raw
            .drivers
            .concurrency
            .unwrap_or(mint_core::DRIVER_CONCURRENCY);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(at(format!(
                "drivers.concurrency: {concurrency} is outside 1..={MAX_CONCURRENCY}"
            )));
        }
        let per_endpoint = raw.drivers.per_endpoint.unwrap_or(mint_core::PER_ENDPOINT);
        if per_endpoint == 0 || per_endpoint > concurrency {
            return Err(at(format!(
                "drivers.per-endpoint: {per_endpoint} is outside 1..={concurrency} (drivers.concurrency)"
            )));
        }
        let health_check = match raw.drivers.health_check_secs {
            None => mint_core::HEALTH_CHECK_EVERY,
            Some(s @ 1..=86_400) => std::time::Duration::from_secs(s),
            Some(s) => {
                return Err(at(format!(
                    "drivers.health-check-secs: {s} is outside 1..=86400"
                )));
            }
        };
        let materialize_root = match raw.materialize.root {
            None => None,
            Some(r) => Some(if r.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(r)
            } else {
                r
            }),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let deploy_iso = match raw.deploy.iso {
            None => None,
            Some(iso) => {
                let iso = if iso.is_relative() {
                    base.join(iso)
                } else {
                    iso
                };
                mint_core::images::disk::check_iso(&iso).map_err(|e| {
                    at(format!(
                        "deploy.iso: {e}; build it with `cargo xtask deploy-iso`"
                    ))
                })?;
                Some(iso)
            }
        };
        let place = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let n = raw.netboot;
        let listen = n
            .listen
            .map(|l| {
                l.parse::<std::net::SocketAddr>().map_err(|_| {
                    at(format!(
                        "netboot.listen: `{l}` is not ADDRESS:PORT; write e.g. \"198.18.0.1:8081\" (the engine's address on the boot network)"
                    ))
                })
            })
            .transpose()?;
        if listen.is_some() && n.stage.is_none() {
            return Err(at(
                "netboot.stage: network boot needs the boot stage; build it with `cargo xtask boot-stage` and give its path".into(),
            ));
        }
        if let Some(u) = &n.url
            && !u.starts_with("http://")
        {
            return Err(at(format!(
                "netboot.url: `{u}` must be an http:// URL (firmware fetches boot scripts without TLS)"
            )));
        }
        if let Some(m) = n.modules.iter().find(|m| {
            m.is_empty()
                || !m
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }) {
            return Err(at(format!(
                "netboot.modules: `{m}` is not a module name (letters, digits, _ and -)"
            )));
        }
        if n.cmdline.contains('\n') {
            return Err(at("netboot.cmdline: one line of kernel parameters".into()));
        }
        let stage = n.stage.map(place);
        if let Some(st) = &stage
            && !st.is_file()
        {
            return Err(at(format!(
                "netboot.stage: {} is not a file; build it with `cargo xtask boot-stage`",
                st.display()
            )));
        }
        let ca = n.ca.map(place);
        if let Some(ca) = &ca {
            mint_tls::ClientTrust::new(&mint_tls::Trust::Ca(ca.clone())).map_err(|e| {
                at(format!(
                    "netboot.ca: {e}; give a PEM file of the CA certificates that signed the engine's certificate and the blob cache's"
                ))
            })?;
        }
        let netboot = crate::netboot::Settings {
            listen,
            url: n.url.map(|u| u.trim_end_matches('/').to_string()),
            stage,
            cmdline: n.cmdline,
            modules: n.modules,
            hosts_file: n.dnsmasq_hosts.map(place),
            pid_file: n.dnsmasq_pid_file.map(place),
            check_source: n.check_source.unwrap_or(true),
            ca,
        };
        let mut endpoint_tls = mint_plugins::TlsPolicies::default();
        for (i, e) in raw.endpoint.into_iter().enumerate() {
            let at = format!("{}: endpoint #{}", path.display(), i + 1);
            let trust = endpoint_trust(&at, &e.tls, base)?;
            endpoint_tls.add(&at, e.node, e.endpoint, trust)?;
        }
        let transfers = raw
            .artifacts
            .transfers
            .unwrap_or(crate::delivery::TRANSFERS);
        if !(1..=4096).contains(&transfers) {
            return Err(at(format!(
                "artifacts.transfers: {transfers} is outside 1..=4096"
            )));
        }
        let bandwidth = match raw.artifacts.bandwidth_mbps.unwrap_or(0) {
            m @ 0..=1_000_000 => m * 1_000_000 / 8,
            m => {
                return Err(at(format!(
                    "artifacts.bandwidth-mbps: {m} is above 1000000 (1 Tbit/s); 0 turns the cap off"
                )));
            }
        };
        let scrub = match raw.artifacts.scrub_hours {
            None => SCRUB_EVERY,
            Some(h @ 1..=8760) => std::time::Duration::from_secs(h * 3600),
            Some(h) => {
                return Err(at(format!(
                    "artifacts.scrub-hours: {h} is outside 1..=8760"
                )));
            }
        };
        let blob_base = raw
            .artifacts
            .blob_base
            .map(|b| blob_base(&b).map_err(|e| at(format!("artifacts.blob-base: {e}"))))
            .transpose()?;
        Ok(Config {
            plugins: PluginPolicy { trust, grants },
            credentials,
            concurrency,
            per_endpoint,
            health_check,
            materialize_root,
            endpoint_tls,
            transfers,
            bandwidth,
            scrub,
            blob_base,
            deploy_iso,
            netboot,
        })
    }
}

impl Config {
    /// Puts the configuration into effect: trust and grants for plugins loaded from now on,
    /// credentials and concurrency for calls that start from now on.
    pub(crate) fn apply(
        self,
        engine: &mint_core::Engine,
        delivery: &crate::delivery::Delivery,
        netboot: &crate::netboot::Netboot,
    ) {
        if let Err(e) = netboot.set(self.netboot.clone()) {
            tracing::error!("{e}; network boot serves no boot stage until it is fixed");
        }
        tracing::info!(
            trusted = ?self.plugins.trust.describe(),
            credentials = ?self.credentials.summary(),
            endpoint_tls = ?self.endpoint_tls.summary(),
            concurrency = self.concurrency,
            per_endpoint = self.per_endpoint,
            health_check_secs = self.health_check.as_secs(),
            transfers = self.transfers,
            bandwidth_bytes_per_sec = self.bandwidth,
            blob_base = self.blob_base.as_deref().unwrap_or("(the engine)"),
            "configuration"
        );
        delivery.set(self.transfers, self.bandwidth, self.scrub);
        delivery.set_blob_base(self.blob_base);
        // The deploy ISO is kept as a blob (collection keeps it) and served by digest.
        let iso = self.deploy_iso.as_ref().map(|p| {
            std::fs::read(p)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    engine
                        .images
                        .put_blob(&bytes)
                        .map(|d| (d, bytes.len() as u64))
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("deploy.iso {}: {e}", p.display()))
        });
        match iso {
            Some(Ok((digest, size))) => {
                tracing::info!(%digest, size, "deploy ISO");
                engine
                    .kept_blobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(digest.clone());
                delivery.set_deploy_iso(Some((digest, size)));
            }
            Some(Err(e)) => tracing::error!(
                "{e}; disk masters cannot be deployed through BMCs until it is fixed"
            ),
            None => delivery.set_deploy_iso(None),
        }
        engine.permits.set(self.concurrency, self.per_endpoint);
        engine.health_check_ms.store(
            self.health_check.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        engine.plugins.runtime().set_credentials(self.credentials);
        engine.plugins.runtime().set_tls_policies(self.endpoint_tls);
        engine.plugins.set_policy(self.plugins);
    }
}

/// Reads the configuration again on SIGHUP (rotated BMC passwords, a new vendor key) and
/// applies it; a file that does not check out is reported and the running configuration
/// kept. Plugins already loaded stay loaded.
pub(crate) fn reload_on_hangup(
    app: crate::Shared,
    path: Option<PathBuf>,
    cert: Option<mint_tls::ServerCert>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    if path.is_none() && cert.is_none() {
        return;
    }
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!(
            "cannot listen for SIGHUP; the configuration and certificate are read at start only"
        );
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hangups.recv() => {}
                _ = stop.changed() => return,
            }
            if let Some(cert) = &cert {
                crate::tls::reload(&app, cert);
            }
            let Some(path) = &path else { continue };
            match Config::read(path) {
                Ok(c) => {
                    *app.materialize_root
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = c.materialize_root.clone();
                    c.apply(&app.engine, &app.delivery, &app.netboot);
                    let _ = app.engine.store.note(
                        "configuration-reloaded",
                        format!("configuration reloaded from {}", path.display()),
                        serde_json::json!({}),
                        mint_model::records::ENGINE,
                    );
                }
                Err(e) => tracing::error!("SIGHUP: keeping the running configuration: {e}"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let p = Path::new("/etc/mint/mint.toml");
        for (text, needle) in [
            ("[plugins]\nallow_unsigned = true", "allow_unsigned"),
            (
                "[plugins.trusted-keys]\nacme = [\"nope\"]",
                "plugins.trusted-keys.acme",
            ),
            ("[plugins.grants]\nx = [\"ftp://h\"]", "plugins.grants.x"),
            ("[drivers]\nconcurrency = 0", "drivers.concurrency"),
            (
                "[drivers]\nconcurrency = 2\nper-endpoint = 3",
                "drivers.per-endpoint",
            ),
            (
                "[drivers]\nhealth-check-secs = 0",
                "drivers.health-check-secs",
            ),
            (
                "[credentials]\nfile = \"/nonexistent/creds.toml\"",
                "credentials.file",
            ),
            (
                "[[endpoint]]\ntls = \"trusting\"",
                "endpoint #1: field `tls`",
            ),
            ("[[endpoint]]\ntls = { pin = \"md5:00\" }", "tls.pin"),
            (
                "[[endpoint]]\ntls = { ca = \"/nonexistent/ca.pem\" }",
                "/nonexistent/ca.pem",
            ),
            (
                "[[endpoint]]\nnode = \"a\"\nendpoint = \"https://h\"\ntls = \"system\"",
                "not both",
            ),
            (
                "[[endpoint]]\ntls = \"insecure\"\n[[endpoint]]\ntls = \"system\"",
                "endpoint #2",
            ),
            (
                "[artifacts]\nblob-base = \"http://cache:8080\"",
                "artifacts.blob-base",
            ),
            (
                "[artifacts]\nblob-base = \"https://u:p@cache\"",
                "artifacts.blob-base",
            ),
            (
                "[artifacts]\nblob-base = \"https://cache/?x\"",
                "artifacts.blob-base",
            ),
            ("[netboot]\nca = \"/nonexistent/ca.pem\"", "netboot.ca"),
            ("[netboot]\nca = \"/etc/hostname\"", "netboot.ca"),
        ] {
            let e = Config::parse(p, text).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("/etc/mint/mint.toml"),
                "{needle}: {e}"
            );
        }
        let inline =
            "[[credentials.credential]]\nnode = \"n1\"\nusername = \"u\"\npassword = \"hunter2\"\n";
        let c = Config::parse(p, inline).unwrap();
        assert_eq!(c.credentials.summary(), vec!["node `n1` as `u`"]);
        let e = Config::parse(p, &format!("{inline}[credentials]\nfile = \"x\"\n")).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = Config::parse(
            p,
            "[[credentials.credential]]\nnode = \"n1\"\npassword = \"hunter2\"\n",
        )
        .unwrap_err();
        assert!(e.contains("username") && !e.contains("hunter2"), "{e}");
        let c = Config::parse(p, "").unwrap();
        assert_eq!(c.concurrency, mint_core::DRIVER_CONCURRENCY);
        assert!(!c.plugins.trust.allow_unsigned);
        assert_eq!(c.blob_base, None);
        let c = Config::parse(
            p,
            "[artifacts]\nblob-base = \"https://cache.example:8443/\"",
        )
        .unwrap();
        assert_eq!(c.blob_base.as_deref(), Some("https://cache.example:8443"));
    }
}
