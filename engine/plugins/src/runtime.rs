//! The plugin runtime: one wasmtime `Engine`, components compiled once and cached on
//! disk, one `InstancePre` per plugin, and a fresh `Store` per call bounded in memory,
//! CPU and wall time.

use crate::bindings::customizer::exports::mint::plugin::customizer::{Edit, Instance};
use crate::bindings::customizer::mint::plugin::tier::Peer;
use crate::bindings::driver::exports::mint::plugin::driver::{Deployment, Node, StatusReport};
use crate::bindings::policy::exports::mint::plugin::node_policy::{Choice, SelectionRequest};
use crate::bindings::{self, ErrorKind, PluginError};
use crate::checks;
use crate::credentials::Credentials;
use crate::error::{CallError, LoadError};
use crate::manifest::{HostPattern, Kind, Manifest};
use crate::master::MasterView;
use crate::state::{CallInputs, CallState, LogLine};
use crate::version::{HOST_WIT, WitVersion};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

/// How often the epoch advances; a call's CPU deadline is counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How the runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where compiled components are cached; none compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// How many calls may hold an instance at once (the pooling allocator's slots).
    pub max_instances: u32,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_instances: 256,
        }
    }
}

/// Outbound hosts the operator grants; a plugin gets the ones it requests among these.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Granted destinations.
    pub outbound_hosts: Vec<HostPattern>,
}

/// How a load obtained its compiled code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeSource {
    /// Compiled now (and written to the cache when there is one).
    Compiled,
    /// Read from the on-disk cache.
    Cached,
}

/// The result of a successful call: its value, what the plugin logged, and how long it took.
#[derive(Debug, Clone)]
pub struct Called<T> {
    /// The checked answer.
    pub value: T,
    /// The plugin's log lines.
    pub logs: Vec<LogLine>,
    /// Lines past the cap, counted but not kept.
    pub dropped_logs: usize,
    /// Wall time of the call, instantiation included.
    pub elapsed: Duration,
    /// The part of `elapsed` spent waiting on outbound HTTP requests (a driver's BMC or
    /// agent).
    pub waited: Duration,
    /// The part of `elapsed` spent running the guest's own code; the rest is the host's
    /// (instantiation, imports, waits such as sleeps between polls).
    pub in_guest: Duration,
}

/// What one loaded plugin has cost since it was loaded, across all its calls.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed (trap, timeout, memory, refusal, invalid answer).
    pub failures: u64,
    /// Wall time of all calls, in milliseconds.
    pub busy_ms: f64,
    /// The part of `busy_ms` spent waiting on outbound HTTP requests.
    pub waited_ms: f64,
    /// The part of `busy_ms` spent running the guest's own code in the sandbox.
    pub guest_ms: f64,
}

/// One finished call as the host measured it, handed to the runtime's observer (a
/// metrics registry): which plugin and call, how it ended, and where its time went.
#[derive(Debug, Clone, Copy)]
pub struct CallRecord<'a> {
    /// The plugin's name.
    pub plugin: &'a str,
    /// The WIT function called (`select`, `deploy`, ...).
    pub call: &'static str,
    /// `ok`, or the kind of failure ([`CallError::outcome`]).
    pub outcome: &'static str,
    /// Wall time, instantiation included.
    pub elapsed: Duration,
    /// The part of `elapsed` spent waiting on outbound HTTP requests.
    pub waited: Duration,
    /// The part of `elapsed` spent running the guest's own code in the sandbox.
    pub in_guest: Duration,
}

/// What is told of every finished call, in every plugin of a runtime.
pub type CallObserver = Arc<dyn Fn(&CallRecord<'_>) + Send + Sync>;

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    busy_ns: AtomicU64,
    waited_ns: AtomicU64,
    guest_ns: AtomicU64,
}

/// The wasmtime side of mint: compiles, caches, checks and instantiates plugins.
pub struct Runtime {
    engine: Engine,
    policy_linker: Linker<CallState>,
    customizer_linker: Linker<CallState>,
    driver_linker: Linker<CallState>,
    cache_dir: Option<PathBuf>,
    stop_ticker: Arc<AtomicBool>,
    credentials: Arc<RwLock<Arc<Credentials>>>,
    tls: Arc<RwLock<Arc<crate::TlsPolicies>>>,
    engine_tls: Arc<RwLock<Option<crate::endpoint_tls::EndpointTrust>>>,
    /// The leader's fencing token, 0 for none (see [`Runtime::set_fencing_token`]).
    fencing_token: Arc<AtomicU64>,
    /// Told of every finished call (see [`Runtime::set_observer`]).
    observer: Arc<RwLock<Option<CallObserver>>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// One loaded plugin: its manifest and its pre-linked component, ready to instantiate.
pub struct Plugin {
    manifest: Manifest,
    name: Arc<str>,
    digest: String,
    code: CodeSource,
    engine: Engine,
    outbound: Arc<[HostPattern]>,
    pre: Pre,
    credentials: Arc<RwLock<Arc<Credentials>>>,
    tls: Arc<RwLock<Arc<crate::TlsPolicies>>>,
    engine_tls: Arc<RwLock<Option<crate::endpoint_tls::EndpointTrust>>>,
    fencing_token: Arc<AtomicU64>,
    observer: Arc<RwLock<Option<CallObserver>>>,
    counters: Arc<Counters>,
    built_for: WitVersion,
}

enum Pre {
    Policy(bindings::policy::NodePolicyPluginPre<CallState>),
    Customizer(bindings::customizer::CustomizerPluginPre<CallState>),
    Driver(bindings::driver::DriverPluginPre<CallState>),
}

fn host_error(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption) and the three linkers.
    pub fn new(options: RuntimeOptions) -> Result<Runtime, String> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = options.max_instances.max(1);
        pool.total_component_instances(slots)
            .total_core_instances(slots * 4)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_memory_size((crate::manifest::MAX_MEMORY_MIB as usize) << 20)
            // Resetting a slot by zeroing the pages a typical call touched is cheaper than
            // returning them to the kernel and faulting them in again on the next call.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .async_stack_keep_resident(128 << 10);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(host_error)?;

        let mut policy_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut policy_linker).map_err(host_error)?;
        let mut customizer_linker = policy_linker.clone();
        let mut driver_linker = policy_linker.clone();
        bindings::policy::NodePolicyPlugin::add_to_linker::<_, HasSelf<CallState>>(
            &mut policy_linker,
            |s| s,
        )
        .map_err(host_error)?;
        bindings::customizer::CustomizerPlugin::add_to_linker::<_, HasSelf<CallState>>(
            &mut customizer_linker,
            |s| s,
        )
        .map_err(host_error)?;
        bindings::driver::DriverPlugin::add_to_linker::<_, HasSelf<CallState>>(
            &mut driver_linker,
            |s| s,
        )
        .map_err(host_error)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut driver_linker)
            .map_err(host_error)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("mint-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(host_error)?;
        if let Some(dir) = &options.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
        }
        Ok(Runtime {
            engine,
            policy_linker,
            customizer_linker,
            driver_linker,
            cache_dir: options.cache_dir,
            stop_ticker,
            credentials: Arc::default(),
            tls: Arc::default(),
            engine_tls: Arc::default(),
            fencing_token: Arc::default(),
            observer: Arc::default(),
        })
    }

    /// Sets the pin of the certificate the engine's own API serves, which drivers' reads of
    /// their artifacts (under the engine's URL) are checked against; none: the system's roots.
    pub fn set_engine_pin(&self, pin: Option<mint_tls::Pin>) {
        let trust = pin.and_then(|p| {
            let t = mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(p)).ok()?;
            Some(crate::endpoint_tls::EndpointTrust {
                trust: Arc::new(t),
                from: "the engine's own certificate".into(),
            })
        });
        *self.engine_tls.write().unwrap_or_else(|p| p.into_inner()) = trust;
    }

    /// Sets the fencing token of the leader this engine is (none: it does not lead, or
    /// its store needs no leader). The host adds it to every request a driver makes to a
    /// node endpoint, as `Mint-Fencing-Token`, so an agent can refuse a deposed leader.
    pub fn set_fencing_token(&self, token: Option<u64>) {
        self.fencing_token
            .store(token.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets what is told of every call that finishes from now on, in every plugin loaded
    /// or to be loaded: the daemon's metrics. It runs on the calling task, so it must be
    /// quick and must not block.
    pub fn set_observer(&self, observer: CallObserver) {
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Replaces how node endpoints' certificates are trusted; calls that start afterwards
    /// use the new choices, in every plugin already loaded.
    pub fn set_tls_policies(&self, policies: crate::TlsPolicies) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
    }

    /// Replaces the credentials the host adds to drivers' requests to node endpoints;
    /// calls that start afterwards use the new ones, in every plugin already loaded.
    pub fn set_credentials(&self, credentials: Credentials) {
        let mut current = self.credentials.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(credentials.keeping_engine_secrets(&current));
    }

    /// Sets how the engine's own secrets for node endpoints are found (see
    /// [`crate::credentials::EngineSecrets`]); they survive [`Runtime::set_credentials`].
    pub fn set_engine_secrets(&self, secrets: crate::credentials::EngineSecrets) {
        let mut current = self.credentials.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(Credentials::clone(&current).with_engine_secrets(secrets));
    }

    /// Loads a plugin from a `.wasm` file and the manifest beside it (`x.wasm` → `x.toml`).
    pub fn load_file(&self, wasm: &Path, grants: &Grants) -> Result<Plugin, LoadError> {
        let manifest_path = wasm.with_extension("toml");
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| LoadError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let text = read(&manifest_path)?;
        let text = String::from_utf8(text).map_err(|_| LoadError::Manifest {
            source_name: manifest_path.display().to_string(),
            message: "not UTF-8 text".into(),
        })?;
        let manifest = Manifest::parse(&manifest_path.display().to_string(), &text)?;
        let bytes = read(wasm)?;
        self.load(manifest, &bytes, &wasm.display().to_string(), grants)
    }

    /// Loads a plugin from its manifest and component bytes; `what` names the bytes in errors.
    pub fn load(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        what: &str,
        grants: &Grants,
    ) -> Result<Plugin, LoadError> {
        let plugin = manifest.name.clone();
        if !bytes.starts_with(b"\0asm") || bytes.len() < 8 {
            return Err(LoadError::NotWasm {
                plugin,
                what: what.into(),
            });
        }
        // Bytes 4..8 are the version and layer: 1.0 for core modules, layer 1 for components.
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule {
                plugin,
                what: what.into(),
            });
        }
        if !manifest.wit.compatible_with(HOST_WIT) {
            return Err(LoadError::IncompatibleWit {
                plugin,
                found: manifest.wit.to_string(),
                host: HOST_WIT.to_string(),
            });
        }
        for wanted in &manifest.capabilities.outbound_hosts {
            if !grants.outbound_hosts.contains(wanted) {
                return Err(LoadError::NotGranted {
                    plugin,
                    host: wanted.to_string(),
                });
            }
        }
        let digest = hex::encode(Sha256::digest(bytes));
        let (component, code) = self.compile(&plugin, bytes, &digest)?;
        let built_for = check_exports(&self.engine, &component, &manifest)?;

        // A plugin built for a newer 0.1.x than this engine may import what this engine
        // lacks; say so with both versions rather than only the missing name.
        let newer = (built_for > HOST_WIT)
            .then(|| format!("built for mint:plugin@{built_for}, newer than this engine's mint:plugin@{HOST_WIT} (upgrade mint, or build against {HOST_WIT}): "))
            .unwrap_or_default();
        let link = |e: wasmtime::Error| LoadError::Link {
            plugin: plugin.clone(),
            message: format!("{newer}{e:#}"),
        };
        let pre = match manifest.kind {
            Kind::NodePolicy => Pre::Policy(
                bindings::policy::NodePolicyPluginPre::new(
                    self.policy_linker
                        .instantiate_pre(&component)
                        .map_err(link)?,
                )
                .map_err(link)?,
            ),
            Kind::Customizer => Pre::Customizer(
                bindings::customizer::CustomizerPluginPre::new(
                    self.customizer_linker
                        .instantiate_pre(&component)
                        .map_err(link)?,
                )
                .map_err(link)?,
            ),
            Kind::Driver => Pre::Driver(
                bindings::driver::DriverPluginPre::new(
                    self.driver_linker
                        .instantiate_pre(&component)
                        .map_err(link)?,
                )
                .map_err(link)?,
            ),
        };
        Ok(Plugin {
            name: Arc::from(plugin.as_str()),
            outbound: Arc::from(manifest.capabilities.outbound_hosts.clone()),
            manifest,
            digest,
            code,
            engine: self.engine.clone(),
            pre,
            credentials: self.credentials.clone(),
            tls: self.tls.clone(),
            engine_tls: self.engine_tls.clone(),
            fencing_token: self.fencing_token.clone(),
            observer: self.observer.clone(),
            counters: Arc::default(),
            built_for,
        })
    }

    /// The compiled component, from the cache when it holds code for these bytes and this
    /// engine, otherwise compiled now and written to the cache.
    fn compile(
        &self,
        plugin: &str,
        bytes: &[u8],
        digest: &str,
    ) -> Result<(Component, CodeSource), LoadError> {
        let compile_error = |e: wasmtime::Error| LoadError::Compile {
            plugin: plugin.into(),
            message: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Ok((
                Component::new(&self.engine, bytes).map_err(compile_error)?,
                CodeSource::Compiled,
            ));
        };
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let path = dir.join(format!("{digest}-{:016x}.cwasm", h.finish()));
        if path.exists() {
            // SAFETY: the cache directory is the engine's own; files in it were written by
            // `precompile_component` below under a name that binds the source digest and the
            // engine's compatibility hash. A file that fails to load is recompiled.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                return Ok((c, CodeSource::Cached));
            }
        }
        let code = self
            .engine
            .precompile_component(bytes)
            .map_err(compile_error)?;
        // Write then rename, so that a concurrent or interrupted load never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &code)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(plugin, path = %path.display(), "cannot write the compiled-code cache");
        }
        // SAFETY: `code` was produced by `precompile_component` of this engine just now.
        let component =
            unsafe { Component::deserialize(&self.engine, &code) }.map_err(compile_error)?;
        Ok((component, CodeSource::Compiled))
    }
}

/// Checks that the component exports the interface of its declared kind at a compatible
/// version, and says what it does export otherwise. Returns the version it was built for.
fn check_exports(
    engine: &Engine,
    component: &Component,
    manifest: &Manifest,
) -> Result<WitVersion, LoadError> {
    let plugin = manifest.name.clone();
    let ty = component.component_type();
    let mut found = Vec::new();
    let mut ours = None;
    for (name, _) in ty.exports(engine) {
        found.push(format!("`{name}`"));
        if let Some(rest) = name.strip_prefix("mint:plugin/") {
            let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
            if Kind::from_interface(interface).is_some() {
                ours = Some((interface.to_string(), version.to_string()));
            }
        }
    }
    let expected = manifest.kind.export_interface();
    match ours {
        Some((interface, version)) if interface == expected => {
            let Some(v) = WitVersion::parse(&version).filter(|v| v.compatible_with(HOST_WIT))
            else {
                return Err(LoadError::IncompatibleWit {
                    plugin,
                    found: version,
                    host: HOST_WIT.to_string(),
                });
            };
            if v.minor != manifest.wit.minor || v.major != manifest.wit.major {
                return Err(LoadError::Manifest {
                    source_name: plugin,
                    message: format!(
                        "field `wit` says {} but the component was built for {version}",
                        manifest.wit
                    ),
                });
            }
            Ok(v)
        }
        _ => Err(LoadError::WrongKind {
            plugin,
            kind: manifest.kind,
            expected,
            found: if found.is_empty() {
                "nothing".into()
            } else {
                found.join(", ")
            },
        }),
    }
}

fn error_kind(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::InvalidInput => "invalid input",
        ErrorKind::Unsatisfiable => "unsatisfiable",
        ErrorKind::External => "external failure",
        ErrorKind::Internal => "internal error",
    }
}

/// The per-call configuration: the manifest's defaults with `overrides` laid over them.
fn merged_config(
    defaults: &serde_json::Map<String, serde_json::Value>,
    overrides: Option<&serde_json::Value>,
) -> Result<String, String> {
    let mut merged = defaults.clone();
    match overrides {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(o)) => merged.extend(o.clone()),
        Some(other) => {
            return Err(format!(
                "the configuration must be a JSON object, not `{other}`"
            ));
        }
    }
    Ok(serde_json::Value::Object(merged).to_string())
}

impl Plugin {
    /// The plugin's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// sha256 of the component's bytes, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// The `mint:plugin` version the component was built for, read from its exports.
    pub fn built_for(&self) -> WitVersion {
        self.built_for
    }
    /// The WIT world the component implements, such as `mint:plugin/node-policy-plugin`.
    pub fn world(&self) -> String {
        format!("mint:plugin/{}-plugin", self.manifest.kind.as_str())
    }
    /// Whether the load compiled the component or read it from the cache.
    pub fn code_source(&self) -> CodeSource {
        self.code
    }

    /// What this plugin has cost since it was loaded.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        Stats {
            calls: c.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            busy_ms: ms(&c.busy_ns),
            waited_ms: ms(&c.waited_ns),
            guest_ms: ms(&c.guest_ns),
        }
    }

    fn store(&self, inputs: CallInputs) -> Store<CallState> {
        let caps = &self.manifest.capabilities;
        let deadline = Instant::now() + Duration::from_millis(caps.timeout_ms);
        let state = CallState::new(
            self.name.clone(),
            (caps.memory_mib as usize) << 20,
            self.outbound.clone(),
            inputs,
            deadline,
            self.fencing_token.load(Ordering::SeqCst),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.call_hook(|mut cx, hook| {
            cx.data_mut().guest.hook(hook);
            Ok(())
        });
        // Every tick the guest yields to the executor, so a plugin that computes for
        // seconds shares its thread with the rest of the daemon instead of holding it; at
        // the call's deadline it is interrupted.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                wasmtime::UpdateDeadline::Interrupt
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        store
    }

    fn wrong_kind(&self, call: &'static str) -> CallError {
        CallError::WrongKind {
            plugin: self.manifest.name.clone(),
            call,
            kind: self.manifest.kind,
        }
    }

    /// A driver call's inputs: with the endpoints the node's properties name, for the
    /// properties the manifest lists in `node-endpoints`, and read access to the
    /// deployment's own artifact.
    fn node_inputs(
        &self,
        call: &'static str,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
    ) -> Result<CallInputs, CallError> {
        let mut inputs = self.inputs(call, config)?;
        inputs.artifact = Some(d.artifact.url.clone());
        inputs.artifact_tls = self
            .engine_tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        for wanted in &self.manifest.capabilities.node_endpoints {
            if let Some((_, url)) = node.properties.iter().find(|(k, _)| k == wanted) {
                let p = HostPattern::of_url(url).map_err(|m| CallError::Host {
                    plugin: self.manifest.name.clone(),
                    call,
                    message: format!("node `{}` property `{wanted}`: {m}", node.name),
                })?;
                // The engine's own credential for this endpoint (its agent's) first: an
                // operator's default BMC password must never go to an agent.
                let authorization = credentials
                    .engine_secret(&node.name, wanted)
                    .or_else(|| credentials.lookup(&node.name, &p).cloned());
                // An agent is trusted by the pin it reported when it registered (with its
                // node's credential); any other endpoint as the operator configured.
                let agent_pin = (wanted == "agent-url")
                    .then(|| node.properties.iter().find(|(k, _)| k == crate::AGENT_PIN))
                    .flatten();
                let tls = match agent_pin {
                    Some((_, pin)) => {
                        let pin = pin.parse().map_err(|e| CallError::Host {
                            plugin: self.manifest.name.clone(),
                            call,
                            message: format!(
                                "node `{}` property `{}`: {e}",
                                node.name,
                                crate::AGENT_PIN
                            ),
                        })?;
                        let trust = mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(pin))
                            .map_err(|e| CallError::Host {
                                plugin: self.manifest.name.clone(),
                                call,
                                message: e.to_string(),
                            })?;
                        Some(crate::endpoint_tls::EndpointTrust {
                            trust: Arc::new(trust),
                            from: format!("the pin node `{}`'s agent registered", node.name),
                        })
                    }
                    None => tls.lookup(&node.name, &p).cloned(),
                };
                inputs.endpoints.push(crate::state::Endpoint {
                    pattern: p,
                    authorization,
                    tls,
                });
            }
        }
        Ok(inputs)
    }

    fn inputs(
        &self,
        call: &'static str,
        config: Option<&serde_json::Value>,
    ) -> Result<CallInputs, CallError> {
        let config_json =
            merged_config(&self.manifest.config, config).map_err(|message| CallError::Host {
                plugin: self.manifest.name.clone(),
                call,
                message,
            })?;
        Ok(CallInputs {
            config_json,
            ..CallInputs::default()
        })
    }

    /// Runs `f` against a fresh store under the plugin's wall-clock limit and turns every
    /// way it can fail into a [`CallError`].
    async fn invoke<R>(
        &self,
        call: &'static str,
        inputs: CallInputs,
        f: impl AsyncFnOnce(&mut Store<CallState>) -> wasmtime::Result<Result<R, PluginError>>,
    ) -> Result<Called<R>, CallError> {
        let started = Instant::now();
        let mut store = self.store(inputs);
        let result = self.run(call, &mut store, started, f).await;
        let (elapsed, waited, in_guest) = (
            started.elapsed(),
            store.data().waited(),
            store.data().guest.total,
        );
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.failures
            .fetch_add(u64::from(result.is_err()), Ordering::Relaxed);
        c.busy_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        c.waited_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        c.guest_ns
            .fetch_add(in_guest.as_nanos() as u64, Ordering::Relaxed);
        // Cloned out of the lock, so an observer never runs while it is held.
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(observe) = observer {
            observe(&CallRecord {
                plugin: &self.name,
                call,
                outcome: match &result {
                    Ok(_) => "ok",
                    Err(e) => e.outcome(),
                },
                elapsed,
                waited,
                in_guest,
            });
        }
        result
    }

    async fn run<R>(
        &self,
        call: &'static str,
        store: &mut Store<CallState>,
        started: Instant,
        f: impl AsyncFnOnce(&mut Store<CallState>) -> wasmtime::Result<Result<R, PluginError>>,
    ) -> Result<Called<R>, CallError> {
        let limit = Duration::from_millis(self.manifest.capabilities.timeout_ms);
        // The epoch deadline stops a guest spinning in its own code; this timeout also
        // covers time spent waiting in host calls (an HTTP request, for a driver).
        let outcome = tokio::time::timeout(limit + EPOCH_TICK * 5, f(&mut *store)).await;
        let plugin = self.manifest.name.clone();
        let state = store.data();
        let result = match outcome {
            Err(_) => {
                return Err(CallError::Timeout {
                    plugin,
                    call,
                    limit,
                });
            }
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if state.limits.exceeded {
                    return Err(CallError::MemoryLimit {
                        plugin,
                        call,
                        limit_mib: self.manifest.capabilities.memory_mib,
                        stderr: state.stderr_text(),
                    });
                }
                if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
                    return Err(CallError::Timeout {
                        plugin,
                        call,
                        limit,
                    });
                }
                let message = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(t) => t.to_string(),
                    None => e.to_string(),
                };
                return Err(CallError::Trap {
                    plugin,
                    call,
                    message,
                    stderr: state.stderr_text(),
                });
            }
        };
        let denied = state.denied();
        let tls_refused = state.tls_refused();
        match result {
            Ok(value) => Ok(Called {
                value,
                logs: state.logs.clone(),
                dropped_logs: state.dropped_logs,
                elapsed: started.elapsed(),
                waited: state.waited(),
                in_guest: state.guest.total,
            }),
            Err(pe) => {
                let mut message = pe.message;
                if !denied.is_empty() {
                    message.push_str(&format!(
                        " (the host denied outbound requests to {}: neither in capabilities.allowed-outbound-hosts nor the node's own endpoint)",
                        denied.join(", ")
                    ));
                }
                if !tls_refused.is_empty() {
                    message.push_str(&format!(" (the host refused: {})", tls_refused.join("; ")));
                }
                Err(CallError::Refused {
                    plugin,
                    call,
                    kind: error_kind(pe.kind),
                    message,
                })
            }
        }
    }

    /// Asks a node policy to choose `request.count` candidates; the answer is checked
    /// (count, distinct, in range, eligible) before it is returned. `names` are the
    /// candidates' names by index, for messages (the request does not carry them).
    pub async fn select(
        &self,
        request: &SelectionRequest,
        names: &[String],
        config: Option<&serde_json::Value>,
    ) -> Result<Called<Vec<Choice>>, CallError> {
        const CALL: &str = "select";
        let Pre::Policy(pre) = &self.pre else {
            return Err(self.wrong_kind(CALL));
        };
        let inputs = self.inputs(CALL, config)?;
        let called = self
            .invoke(CALL, inputs, async |store| {
                let bindings = pre.instantiate_async(&mut *store).await?;
                bindings
                    .mint_plugin_node_policy()
                    .call_select(&mut *store, request)
                    .await
            })
            .await?;
        let value = checks::selection(request, names, called.value).map_err(|problem| {
            CallError::InvalidAnswer {
                plugin: self.manifest.name.clone(),
                call: CALL,
                problem,
            }
        })?;
        Ok(Called { value, ..called })
    }

    /// Asks a customizer for one instance's edits; the answer is checked before it is
    /// returned.
    pub async fn customize(
        &self,
        instance: &Instance,
        peers: Arc<[Peer]>,
        master: Arc<dyn MasterView>,
        config: Option<&serde_json::Value>,
    ) -> Result<Called<Vec<Edit>>, CallError> {
        const CALL: &str = "customize";
        let Pre::Customizer(pre) = &self.pre else {
            return Err(self.wrong_kind(CALL));
        };
        let inputs = CallInputs {
            master,
            peers,
            ..self.inputs(CALL, config)?
        };
        let called = self
            .invoke(CALL, inputs, async |store| {
                let bindings = pre.instantiate_async(&mut *store).await?;
                bindings
                    .mint_plugin_customizer()
                    .call_customize(&mut *store, instance)
                    .await
            })
            .await?;
        checks::edits(&called.value).map_err(|problem| CallError::InvalidAnswer {
            plugin: self.manifest.name.clone(),
            call: CALL,
            problem,
        })?;
        Ok(called)
    }

    /// Asks a driver to deploy.
    pub async fn deploy(
        &self,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
    ) -> Result<Called<StatusReport>, CallError> {
        const CALL: &str = "deploy";
        let Pre::Driver(pre) = &self.pre else {
            return Err(self.wrong_kind(CALL));
        };
        let called = self
            .invoke(
                CALL,
                self.node_inputs(CALL, node, d, config)?,
                async |store| {
                    let b = pre.instantiate_async(&mut *store).await?;
                    b.mint_plugin_driver()
                        .call_deploy(&mut *store, node, d)
                        .await
                },
            )
            .await?;
        Ok(clip_detail(called))
    }

    /// Asks a driver to undeploy.
    pub async fn undeploy(
        &self,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
    ) -> Result<Called<()>, CallError> {
        const CALL: &str = "undeploy";
        let Pre::Driver(pre) = &self.pre else {
            return Err(self.wrong_kind(CALL));
        };
        self.invoke(
            CALL,
            self.node_inputs(CALL, node, d, config)?,
            async |store| {
                let b = pre.instantiate_async(&mut *store).await?;
                b.mint_plugin_driver()
                    .call_undeploy(&mut *store, node, d)
                    .await
            },
        )
        .await
    }

    /// Asks a driver for the status of a deployment it is following.
    pub async fn status(
        &self,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
    ) -> Result<Called<StatusReport>, CallError> {
        self.status_call(node, d, config, false).await
    }

    /// Asks a driver for the status of an instance recorded running: a health check
    /// (`host.checking-health` answers true during it).
    pub async fn check(
        &self,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
    ) -> Result<Called<StatusReport>, CallError> {
        self.status_call(node, d, config, true).await
    }

    async fn status_call(
        &self,
        node: &Node,
        d: &Deployment,
        config: Option<&serde_json::Value>,
        checking_health: bool,
    ) -> Result<Called<StatusReport>, CallError> {
        const CALL: &str = "status";
        let Pre::Driver(pre) = &self.pre else {
            return Err(self.wrong_kind(CALL));
        };
        let inputs = CallInputs {
            checking_health,
            ..self.node_inputs(CALL, node, d, config)?
        };
        let called = self
            .invoke(CALL, inputs, async |store| {
                let b = pre.instantiate_async(&mut *store).await?;
                b.mint_plugin_driver()
                    .call_status(&mut *store, node, d)
                    .await
            })
            .await?;
        Ok(clip_detail(called))
    }
}

fn clip_detail(mut c: Called<StatusReport>) -> Called<StatusReport> {
    if let Some((at, _)) = c.value.detail.char_indices().nth(1000) {
        c.value.detail.truncate(at);
    }
    c
}
