//! `mint plugin ...`: the plugin author's harness and the operator's plugin management.
//! `run` drives one call of any plugin through the engine's real loader and sandbox and
//! prints the checked result as JSON; `pack` makes a package to sign; `install`, `list`,
//! `inspect` and `remove` manage the daemon's plugins (`inspect FILE` reads a local file).

use crate::Failure;
use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use mint_plugins::fixture::Fixture;
use mint_plugins::types::{Edit, InstanceState};
use mint_plugins::{
    Called, Grants, HostPattern, LogLine, Plugin, Runtime, RuntimeOptions, bundled,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Run one call of a plugin on a JSON fixture and print the result.
    Run(RunArgs),
    /// Show a plugin's WIT world and version, capabilities, signer and costs: one the
    /// daemon has (by name), or a local `.wasm` (with its manifest beside it) or package.
    Inspect(LoadArgs),
    /// List the daemon's plugins: bundled, installed and site files.
    List,
    /// Install a signed package into the daemon; replaces a plugin of the same name for
    /// calls that start afterwards.
    Install {
        /// The package (`mint plugin pack` makes one).
        package: PathBuf,
        /// Its minisign signature (default: PACKAGE.minisig).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Send it without a signature (the daemon refuses unless it allows unsigned packages).
        #[arg(long)]
        unsigned: bool,
    },
    /// Remove an installed plugin no tier uses.
    Remove {
        /// The plugin's name.
        name: String,
    },
    /// Make a package from a component and its manifest, for the vendor to sign with
    /// `minisign -Sm PACKAGE`.
    Pack {
        /// The plugin's manifest.
        #[arg(long)]
        manifest: PathBuf,
        /// The plugin's component.
        #[arg(long)]
        wasm: PathBuf,
        /// Where to write the package.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Args)]
pub struct LoadArgs {
    /// A `.wasm` file with its manifest beside it (`x.wasm` and `x.toml`), or the name of a
    /// bundled plugin (`spread`, `bundled:spread`).
    plugin: String,
    /// Grant outbound HTTP to this destination (`http://127.0.0.1:8080`); repeatable.
    #[arg(long = "allow-host", value_name = "URL")]
    allow_hosts: Vec<String>,
    /// Cache compiled plugins in this directory.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The call's input: a JSON file (see README for the shape per plugin kind).
    #[arg(long, short)]
    input: PathBuf,
    /// Configuration laid over the fixture's and the manifest's, as a JSON object.
    #[arg(long)]
    config: Option<String>,
}

fn load(args: &LoadArgs) -> Result<(Runtime, Plugin), Failure> {
    let outbound_hosts = args
        .allow_hosts
        .iter()
        .map(|h| HostPattern::parse(h).map_err(|e| Failure::usage(anyhow!("--allow-host: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let runtime = Runtime::new(RuntimeOptions {
        cache_dir: args.cache_dir.clone(),
        ..Default::default()
    })
    .map_err(|e| Failure::load(anyhow!("cannot start the plugin runtime: {e}")))?;
    let name = args.plugin.strip_prefix("bundled:").unwrap_or(&args.plugin);
    let path = Path::new(&args.plugin);
    let plugin = if !args.plugin.starts_with("bundled:") && path.exists() {
        runtime
            .load_file(path, &Grants { outbound_hosts })
            .map_err(Failure::load)?
    } else {
        match runtime.load_bundled(name) {
            Some(r) => r.map_err(Failure::load)?,
            None => {
                let names: Vec<_> = bundled::ALL.iter().map(|b| b.name).collect();
                return Err(Failure::usage(anyhow!(
                    "no file `{}` and no bundled plugin of that name (bundled: {})",
                    args.plugin,
                    names.join(", ")
                )));
            }
        }
    };
    Ok((runtime, plugin))
}

async fn daemon(
    conn: &crate::client::Conn,
    req: crate::client::PluginRequest,
) -> Result<(), Failure> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || crate::client::plugin(&conn, req))
        .await
        .map_err(|e| Failure::call(anyhow!("the request's thread failed: {e}")))?
}

pub async fn run(cmd: PluginCommand, conn: &crate::client::Conn) -> Result<(), Failure> {
    use crate::client::PluginRequest;
    match cmd {
        PluginCommand::List => daemon(conn, PluginRequest::List).await,
        PluginCommand::Install {
            package,
            signature,
            unsigned,
        } => {
            daemon(
                conn,
                PluginRequest::Install {
                    package,
                    signature,
                    unsigned,
                },
            )
            .await
        }
        PluginCommand::Remove { name } => daemon(conn, PluginRequest::Remove { name }).await,
        PluginCommand::Pack {
            manifest,
            wasm,
            output,
        } => {
            let read = |p: &Path| {
                std::fs::read(p)
                    .map_err(|e| Failure::usage(anyhow!("cannot read {}: {e}", p.display())))
            };
            let text = String::from_utf8(read(&manifest)?)
                .map_err(|_| Failure::usage(anyhow!("{} is not UTF-8 text", manifest.display())))?;
            let m = mint_plugins::Manifest::parse(&manifest.display().to_string(), &text)
                .map_err(Failure::load)?;
            let bytes = read(&wasm)?;
            // Loading it here finds a broken package before it is signed and shipped.
            let runtime = Runtime::new(RuntimeOptions::default())
                .map_err(|e| Failure::load(anyhow!("cannot start the plugin runtime: {e}")))?;
            let grants = Grants {
                outbound_hosts: m.capabilities.outbound_hosts.clone(),
            };
            runtime
                .load(m.clone(), &bytes, &wasm.display().to_string(), &grants)
                .map_err(Failure::load)?;
            let package = mint_plugins::package::Package {
                manifest: text,
                wasm: bytes,
            }
            .write();
            std::fs::write(&output, &package)
                .map_err(|e| Failure::usage(anyhow!("cannot write {}: {e}", output.display())))?;
            eprintln!(
                "packed `{}` {} into {}; sign it with `minisign -Sm {}`",
                m.name,
                m.version,
                output.display(),
                output.display()
            );
            Ok(())
        }
        PluginCommand::Inspect(args)
            if !Path::new(&args.plugin).exists() && !args.plugin.starts_with("bundled:") =>
        {
            daemon(conn, PluginRequest::Inspect { name: args.plugin }).await
        }
        PluginCommand::Inspect(args) => {
            let (_rt, p) = load(&args)?;
            let m = p.manifest();
            let out = json!({
                "name": m.name, "version": m.version, "kind": m.kind.as_str(),
                "wit": format!("mint:plugin@{}", p.built_for()),
                "world": p.world(),
                "description": m.description,
                "vendor": m.vendor,
                "signer": "not checked (a local file)",
                "sha256": p.digest(),
                "capabilities": {
                    "memory-mib": m.capabilities.memory_mib,
                    "timeout-ms": m.capabilities.timeout_ms,
                    "allowed-outbound-hosts": m.capabilities.outbound_hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "node-endpoints": m.capabilities.node_endpoints,
                },
                "config": m.config,
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            Ok(())
        }
        PluginCommand::Run(args) => run_call(args).await,
    }
}

fn logs_json(logs: &[LogLine], dropped: usize) -> Value {
    json!({ "lines": logs, "dropped": dropped })
}

fn meta<T>(c: &Called<T>) -> (Value, u128) {
    (logs_json(&c.logs, c.dropped_logs), c.elapsed.as_micros())
}

/// An edit as JSON, with file contents as text when they are UTF-8.
pub fn edit_json(e: &Edit) -> Value {
    match e {
        Edit::WriteFile(w) => {
            let contents = match std::str::from_utf8(&w.contents) {
                Ok(t) => json!(t),
                Err(_) => json!(format!("<{} bytes of binary>", w.contents.len())),
            };
            json!({"write-file": w.path, "mode": format!("{:o}", w.meta.mode), "uid": w.meta.uid, "gid": w.meta.gid, "contents": contents})
        }
        Edit::Remove(p) => json!({ "remove": p }),
        Edit::Symlink(s) => json!({ "symlink": s.path, "target": s.target }),
        Edit::MakeDir(d) => json!({ "make-dir": d.path, "mode": format!("{:o}", d.meta.mode) }),
    }
}

/// The path an edit touches.
pub fn edit_path(e: &Edit) -> &str {
    match e {
        Edit::WriteFile(w) => &w.path,
        Edit::Remove(p) => p,
        Edit::Symlink(s) => &s.path,
        Edit::MakeDir(d) => &d.path,
    }
}

pub fn state_name(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Absent => "absent",
        InstanceState::Deploying => "deploying",
        InstanceState::Running => "running",
        InstanceState::Failed => "failed",
    }
}

/// A failed call exits 1, except asking a plugin for another kind's call, which is a
/// usage error (the fixture does not fit the plugin).
fn call_failure(e: mint_plugins::CallError) -> Failure {
    match e {
        mint_plugins::CallError::WrongKind { .. } => Failure::usage(e),
        e => Failure::call(e),
    }
}

async fn run_call(args: RunArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read --input {}", args.input.display()))
        .map_err(Failure::usage)?;
    let fixture: Fixture = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "--input {}: not a select, customize or driver fixture (see README)",
                args.input.display()
            )
        })
        .map_err(Failure::usage)?;
    let extra: Option<Value> = match &args.config {
        None => None,
        Some(t) => Some(
            serde_json::from_str(t)
                .context("--config is not JSON")
                .map_err(Failure::usage)?,
        ),
    };
    let overlay = |base: &Option<Value>| -> Option<Value> {
        match (base, &extra) {
            (Some(Value::Object(b)), Some(Value::Object(e))) => {
                let mut m = b.clone();
                m.extend(e.clone());
                Some(Value::Object(m))
            }
            (_, Some(e)) => Some(e.clone()),
            (b, None) => b.clone(),
        }
    };
    let (_rt, plugin) = load(&args.load)?;
    let name = plugin.manifest().name.clone();
    let base = args.input.parent().unwrap_or(Path::new("."));
    let out = match fixture {
        Fixture::Select(f) => {
            let named = f.request.to_wit();
            let c = plugin
                .select(&named.request, &named.names, overlay(&f.config).as_ref())
                .await
                .map_err(call_failure)?;
            let chosen: Vec<Value> = c
                .value
                .iter()
                .map(|ch| json!({"node": named.names[ch.candidate as usize], "score": ch.score, "reason": ch.reason}))
                .collect();
            let (logs, us) = meta(&c);
            json!({"plugin": name, "call": "select", "chosen": chosen, "logs": logs, "elapsed-us": us})
        }
        Fixture::Customize(f) => {
            let (instance, peers, master) = f.to_wit(base);
            let c = plugin
                .customize(&instance, peers, master, overlay(&f.config).as_ref())
                .await
                .map_err(call_failure)?;
            let (logs, us) = meta(&c);
            json!({"plugin": name, "call": "customize", "edits": c.value.iter().map(edit_json).collect::<Vec<_>>(), "logs": logs, "elapsed-us": us})
        }
        Fixture::Drive(f) => {
            let (node, d) = f.to_wit();
            let config = overlay(&f.config);
            let (result, logs, us) = match f.call.as_str() {
                "deploy" | "status" => {
                    let c = if f.call == "deploy" {
                        plugin.deploy(&node, &d, config.as_ref()).await
                    } else {
                        plugin.status(&node, &d, config.as_ref()).await
                    }
                    .map_err(call_failure)?;
                    let (logs, us) = meta(&c);
                    (
                        json!({"state": state_name(c.value.state), "detail": c.value.detail}),
                        logs,
                        us,
                    )
                }
                "undeploy" => {
                    let c = plugin
                        .undeploy(&node, &d, config.as_ref())
                        .await
                        .map_err(call_failure)?;
                    let (logs, us) = meta(&c);
                    (json!(null), logs, us)
                }
                other => {
                    return Err(Failure::usage(anyhow!(
                        "--input: field `call` is `{other}`; use deploy, undeploy or status"
                    )));
                }
            };
            json!({"plugin": name, "call": f.call, "result": result, "logs": logs, "elapsed-us": us})
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
