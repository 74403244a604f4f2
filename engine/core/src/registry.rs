//! The plugin registry: plugins by name, from the engine itself (bundled), from signed
//! packages the operator installed, or from loose files the operator allowed. Installing a
//! plugin under a name already loaded replaces it for calls that start afterwards; calls
//! in flight hold the old version until they finish.
//!
//! Architecture invariant: the registry decides what may load (trust, grants, names) and
//! keeps it on disk under `<data-dir>/plugins/<name>/`; the plugin host decides how it runs.

use crate::{EngineError, Result};
use mint_plugins::package::{Package, Signer, Trust};
use mint_plugins::{Grants, HostPattern, Kind, Manifest, Plugin, Runtime, RuntimeOptions, Stats};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// What the operator allows plugins: whose packages are trusted, and which outbound hosts
/// each plugin (by name) is granted.
#[derive(Debug, Clone, Default)]
pub struct PluginPolicy {
    /// Trusted vendor keys, and whether unsigned packages may load.
    pub trust: Trust,
    /// Outbound hosts granted, by plugin name.
    pub grants: BTreeMap<String, Vec<HostPattern>>,
}

/// Where a plugin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Built into the engine.
    Bundled,
    /// Installed from a package (`mint plugin install`).
    Installed,
    /// A loose `<name>.wasm` + `<name>.toml` in the plugin directory (unsigned).
    SiteFile,
}

/// What `mint plugin list` and `inspect` show of a plugin.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PluginInfo {
    /// Its name.
    pub name: String,
    /// Its own version.
    pub version: String,
    /// Its kind.
    pub kind: Kind,
    /// The WIT world it implements.
    pub world: String,
    /// The `mint:plugin` version its component was built for.
    pub wit: String,
    /// Its manifest's description.
    pub description: String,
    /// Its manifest's vendor.
    pub vendor: Option<String>,
    /// Who vouches for it.
    pub signer: Signer,
    /// Where it came from.
    pub source: Source,
    /// sha256 of its component.
    pub sha256: String,
    /// What it may use: its manifest's `[capabilities]`.
    #[schema(value_type = Object)]
    pub capabilities: serde_json::Value,
    /// Its configuration defaults.
    #[schema(value_type = Object)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// What its calls have cost since it was loaded.
    pub stats: Stats,
    /// When it was installed (milliseconds since the epoch), for installed plugins.
    pub installed_ms: Option<u64>,
}

/// What the registry keeps about an installed plugin beside its package.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Installed {
    signer: Signer,
    installed_ms: u64,
}

struct Entry {
    plugin: Arc<Plugin>,
    signer: Signer,
    source: Source,
    installed_ms: Option<u64>,
}

/// Plugins by name, loaded on first use and kept. Bundled names win: a package or a file
/// cannot take a bundled plugin's name.
pub struct Registry {
    runtime: Runtime,
    dir: Option<PathBuf>,
    loaded: RwLock<HashMap<String, Arc<Entry>>>,
    policy: RwLock<PluginPolicy>,
    /// Serialises installs and removals, so two installs of one name cannot interleave
    /// their file moves.
    changing: std::sync::Mutex<()>,
}

const PACKAGE: &str = "package.mintpkg";
const SIGNATURE: &str = "package.minisig";
const RECORD: &str = "installed.json";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn io(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Invalid(format!("plugin store: {}: {e}", path.display()))
}

impl Registry {
    /// A registry whose compiled code is cached in `cache_dir` and whose installed and site
    /// plugins live in `plugin_dir`.
    pub fn new(cache_dir: Option<PathBuf>, plugin_dir: Option<PathBuf>) -> Result<Registry> {
        let runtime = Runtime::new(RuntimeOptions {
            cache_dir,
            ..Default::default()
        })
        .map_err(EngineError::Invalid)?;
        Ok(Registry {
            runtime,
            dir: plugin_dir,
            loaded: RwLock::new(HashMap::new()),
            policy: RwLock::new(PluginPolicy::default()),
            changing: std::sync::Mutex::new(()),
        })
    }

    /// The plugin runtime (for its credentials).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Sets what the operator allows; plugins load under it from now on. Already loaded
    /// plugins stay until replaced or the daemon restarts.
    pub fn set_policy(&self, policy: PluginPolicy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn policy(&self) -> PluginPolicy {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn grants(&self, name: &str) -> Grants {
        Grants {
            outbound_hosts: self.policy().grants.get(name).cloned().unwrap_or_default(),
        }
    }

    fn insert(&self, name: &str, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        self.loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), entry.clone());
        entry
    }

    fn cached(&self, name: &str) -> Option<Arc<Entry>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Loads every bundled plugin now (from the compiled-code cache when it has them), so
    /// that the first request does not pay for compiling and a broken plugin shows at start.
    pub fn preload_bundled(&self) -> Result<()> {
        for b in mint_plugins::bundled::ALL {
            let p = Arc::new(self.runtime.load_bundled(b.name).expect("listed in ALL")?);
            self.insert(
                b.name,
                Entry {
                    plugin: p,
                    signer: Signer::Bundled,
                    source: Source::Bundled,
                    installed_ms: None,
                },
            );
        }
        Ok(())
    }

    /// Loads every installed package now, checking each signature against the current
    /// trust. Returns one message per package that no longer loads (its key is no longer
    /// trusted, its file changed, ...); those stay on disk and fail the tiers that use them.
    pub fn preload_installed(&self) -> Vec<String> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // What an install interrupted by a crash left: the old or the new version is in
            // place (renames are atomic), so these are leftovers.
            if name.starts_with(".staging-") || name.starts_with(".old-") {
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            if !valid_name(&name) || !e.path().join(PACKAGE).is_file() {
                continue;
            }
            if let Err(err) = self.load_installed(&name) {
                problems.push(format!("installed plugin `{name}` does not load: {err}"));
            }
        }
        problems
    }

    /// The plugin `name`, which must be of `kind`; `field` names the reference in errors.
    pub fn get(&self, name: &str, kind: Kind, field: &str) -> Result<Arc<Plugin>> {
        let entry = match self.cached(name) {
            Some(e) => e,
            None => self.load(name).map_err(|e| match e {
                EngineError::Invalid(m) if m.starts_with("no plugin named") => {
                    EngineError::Invalid(format!("field `{field}`: {m}"))
                }
                other => other,
            })?,
        };
        check_kind(entry.plugin.clone(), kind, field)
    }

    fn load(&self, name: &str) -> Result<Arc<Entry>> {
        if let Some(r) = self.runtime.load_bundled(name) {
            return Ok(self.insert(
                name,
                Entry {
                    plugin: Arc::new(r?),
                    signer: Signer::Bundled,
                    source: Source::Bundled,
                    installed_ms: None,
                },
            ));
        }
        if valid_name(name)
            && let Some(dir) = &self.dir
        {
            if dir.join(name).join(PACKAGE).is_file() {
                return self.load_installed(name);
            }
            let wasm = dir.join(format!("{name}.wasm"));
            if wasm.is_file() {
                return self.load_site(name, &wasm);
            }
        }
        Err(EngineError::Invalid(format!(
            "no plugin named `{name}` ({})",
            self.available()
        )))
    }

    fn load_installed(&self, name: &str) -> Result<Arc<Entry>> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("no plugin directory".into()))?
            .join(name);
        let bytes = std::fs::read(dir.join(PACKAGE)).map_err(|e| io(&dir.join(PACKAGE), e))?;
        let signature = std::fs::read_to_string(dir.join(SIGNATURE)).ok();
        let record: Option<Installed> = std::fs::read(dir.join(RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let (plugin, signer) = self.check(&bytes, signature.as_deref())?;
        if plugin.manifest().name != name {
            return Err(EngineError::Invalid(format!(
                "{}: the package inside names itself `{}`; reinstall it with `mint plugin install`",
                dir.display(),
                plugin.manifest().name
            )));
        }
        Ok(self.insert(
            name,
            Entry {
                plugin: Arc::new(plugin),
                signer,
                source: Source::Installed,
                installed_ms: record.map(|r| r.installed_ms),
            },
        ))
    }

    fn load_site(&self, name: &str, wasm: &Path) -> Result<Arc<Entry>> {
        if !self.policy().trust.allow_unsigned {
            return Err(EngineError::Invalid(format!(
                "plugin file {} is not a signed package; install it with `mint plugin install` as a package its vendor signed, or set `allow-unsigned = true` under [plugins] in the daemon's configuration",
                wasm.display()
            )));
        }
        let p = self.runtime.load_file(wasm, &self.grants(name))?;
        if p.manifest().name != name {
            return Err(EngineError::Invalid(format!(
                "plugin file {} declares the name `{}` in its manifest; rename the file or the manifest's `name` so they agree",
                wasm.display(),
                p.manifest().name
            )));
        }
        Ok(self.insert(
            name,
            Entry {
                plugin: Arc::new(p),
                signer: Signer::Unsigned,
                source: Source::SiteFile,
                installed_ms: None,
            },
        ))
    }

    /// Verifies, reads and loads a package without installing it.
    fn check(&self, bytes: &[u8], signature: Option<&str>) -> Result<(Plugin, Signer)> {
        let policy = self.policy();
        let refused = |e: mint_plugins::package::PackageError| {
            EngineError::Invalid(format!("package refused: {e}"))
        };
        let signer = policy.trust.verify(bytes, signature).map_err(refused)?;
        let package = Package::read(bytes).map_err(refused)?;
        let manifest = Manifest::parse("plugin.toml", &package.manifest)?;
        if let (Some(claimed), Signer::Vendor { vendor, .. }) = (&manifest.vendor, &signer)
            && claimed != vendor
        {
            return Err(refused(mint_plugins::package::PackageError::WrongVendor {
                claimed: claimed.clone(),
                signer: vendor.clone(),
            }));
        }
        if mint_plugins::bundled::get(&manifest.name).is_some() {
            return Err(EngineError::Invalid(format!(
                "package refused: `{}` is the name of a plugin built into mint; give the plugin another `name` in its manifest",
                manifest.name
            )));
        }
        let grants = Grants {
            outbound_hosts: policy
                .grants
                .get(&manifest.name)
                .cloned()
                .unwrap_or_default(),
        };
        let name = manifest.name.clone();
        let plugin = self.runtime.load(manifest, &package.wasm, &format!("package `{name}`"), &grants).map_err(|e| match e {
            mint_plugins::LoadError::NotGranted { plugin, host } => EngineError::Invalid(format!(
                "package refused: plugin `{plugin}` requests outbound access to {host}, which the operator has not granted; grant it in the daemon's configuration (under [plugins.grants]: {plugin} = [\"{host}\"]) or remove it from the manifest"
            )),
            other => EngineError::Load(other),
        })?;
        Ok((plugin, signer))
    }

    /// Installs a package (and its minisign signature): checked against the operator's
    /// trust and grants, loaded, written under the plugin directory and made current.
    /// `in_use` says, for a name and kind, which tier would break if the plugin changed
    /// kind. Nothing changes when any check fails.
    pub fn install(
        &self,
        bytes: &[u8],
        signature: Option<&str>,
        in_use: impl Fn(&str, Kind) -> Option<String>,
    ) -> Result<PluginInfo> {
        let _one = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let (plugin, signer) = self.check(bytes, signature)?;
        let name = plugin.manifest().name.clone();
        if let Some(tier) = in_use(&name, plugin.manifest().kind) {
            return Err(EngineError::Invalid(format!(
                "package refused: tier `{tier}` uses `{name}` as another kind of plugin than this {}; a replacement must keep the kind",
                plugin.manifest().kind
            )));
        }
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("this engine has no plugin directory".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        // Written beside, then renamed into place: a crash leaves the old version or the
        // new one, never half of either.
        let staging = dir.join(format!(".staging-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let record = Installed {
            signer: signer.clone(),
            installed_ms: crate::now_ms(),
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&staging)?;
            std::fs::write(staging.join(PACKAGE), bytes)?;
            if let Some(s) = signature.filter(|s| !s.trim().is_empty()) {
                std::fs::write(staging.join(SIGNATURE), s)?;
            }
            std::fs::write(
                staging.join(RECORD),
                serde_json::to_vec_pretty(&record).unwrap_or_default(),
            )?;
            let f = std::fs::File::open(&staging)?;
            f.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_dir_all(&staging);
            io(&staging, e)
        })?;
        let target = dir.join(&name);
        let old = dir.join(format!(".old-{name}-{}", std::process::id()));
        if target.exists() {
            std::fs::rename(&target, &old).map_err(|e| io(&target, e))?;
        }
        if let Err(e) = std::fs::rename(&staging, &target) {
            let _ = std::fs::rename(&old, &target);
            return Err(io(&target, e));
        }
        let _ = std::fs::remove_dir_all(&old);
        // A loose file of the same name would otherwise confuse the next start.
        let _ = std::fs::remove_file(dir.join(format!("{name}.wasm")));
        let entry = self.insert(
            &name,
            Entry {
                plugin: Arc::new(plugin),
                signer,
                source: Source::Installed,
                installed_ms: Some(record.installed_ms),
            },
        );
        Ok(info(&entry))
    }

    /// Removes an installed (or site) plugin. `in_use` names a tier that still uses it.
    pub fn remove(&self, name: &str, in_use: Option<String>) -> Result<()> {
        let _one = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if mint_plugins::bundled::get(name).is_some() {
            return Err(EngineError::Invalid(format!(
                "`{name}` is built into mint and cannot be removed"
            )));
        }
        if let Some(tier) = in_use {
            return Err(EngineError::Invalid(format!(
                "tier `{tier}` uses plugin `{name}`; delete the tier or change its plugin first"
            )));
        }
        let dir = self
            .dir
            .as_ref()
            .filter(|_| valid_name(name))
            .ok_or_else(|| self.unknown(name))?;
        let installed = dir.join(name);
        let files = [
            dir.join(format!("{name}.wasm")),
            dir.join(format!("{name}.toml")),
        ];
        if !installed.join(PACKAGE).is_file() && !files[0].is_file() {
            return Err(self.unknown(name));
        }
        if installed.exists() {
            std::fs::remove_dir_all(&installed).map_err(|e| io(&installed, e))?;
        }
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        self.loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    fn unknown(&self, name: &str) -> EngineError {
        EngineError::Invalid(format!(
            "no installed plugin named `{name}` ({})",
            self.available()
        ))
    }

    /// What `name` is; loads it if it is not loaded yet.
    pub fn info(&self, name: &str) -> Result<PluginInfo> {
        let entry = match self.cached(name) {
            Some(e) => e,
            None => self.load(name)?,
        };
        Ok(info(&entry))
    }

    /// Every plugin the registry can name, loaded or not: bundled, installed, site files.
    /// One that does not load is listed by the error it gives.
    pub fn list(&self) -> Vec<std::result::Result<PluginInfo, (String, String)>> {
        self.names()
            .into_iter()
            .map(|n| self.info(&n).map_err(|e| (n, e.to_string())))
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = mint_plugins::bundled::ALL
            .iter()
            .map(|b| b.name.to_string())
            .collect();
        if let Some(Ok(entries)) = self.dir.as_ref().map(std::fs::read_dir) {
            let mut extra: Vec<String> = entries
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    let n = if e.path().join(PACKAGE).is_file() {
                        n
                    } else {
                        n.strip_suffix(".wasm")?.to_string()
                    };
                    valid_name(&n).then_some(n)
                })
                .collect();
            extra.sort();
            extra.dedup();
            names.extend(
                extra
                    .into_iter()
                    .filter(|n| mint_plugins::bundled::get(n).is_none()),
            );
        }
        names
    }

    /// The plugins a reference may name, for error messages.
    fn available(&self) -> String {
        let names = self.names();
        match &self.dir {
            Some(_) => format!(
                "available: {}; install others with `mint plugin install`",
                names.join(", ")
            ),
            None => format!("available: {}", names.join(", ")),
        }
    }
}

fn info(e: &Entry) -> PluginInfo {
    let p = &e.plugin;
    let m = p.manifest();
    PluginInfo {
        name: m.name.clone(),
        version: m.version.clone(),
        kind: m.kind,
        world: p.world(),
        wit: format!("mint:plugin@{}", p.built_for()),
        description: m.description.clone(),
        vendor: m.vendor.clone(),
        signer: e.signer.clone(),
        source: e.source,
        sha256: p.digest().to_string(),
        capabilities: serde_json::json!({
            "memory-mib": m.capabilities.memory_mib,
            "timeout-ms": m.capabilities.timeout_ms,
            "allowed-outbound-hosts": m.capabilities.outbound_hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            "node-endpoints": m.capabilities.node_endpoints,
        }),
        config: m.config.clone(),
        stats: p.stats(),
        installed_ms: e.installed_ms,
    }
}

fn check_kind(p: Arc<Plugin>, kind: Kind, field: &str) -> Result<Arc<Plugin>> {
    if p.manifest().kind != kind {
        return Err(EngineError::Invalid(format!(
            "field `{field}`: plugin `{}` is a {}, not a {kind}",
            p.manifest().name,
            p.manifest().kind
        )));
    }
    Ok(p)
}
