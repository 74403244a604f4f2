//! `mint plugin ...`: the plugin author's harness. `run` drives one call of any plugin
//! through the engine's real loader and sandbox and prints the checked result as JSON.

use crate::Failure;
use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use mint_plugins::fixture::Fixture;
use mint_plugins::types::{Edit, InstanceState};
use mint_plugins::{Called, Grants, HostPattern, LogLine, Plugin, Runtime, RuntimeOptions, bundled};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Run one call of a plugin on a JSON fixture and print the result.
    Run(RunArgs),
    /// Show a plugin's manifest, digest and capabilities.
    Inspect(LoadArgs),
    /// List the plugins built into this mint.
    List,
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
    let runtime = Runtime::new(RuntimeOptions { cache_dir: args.cache_dir.clone(), ..Default::default() })
        .map_err(|e| Failure::load(anyhow!("cannot start the plugin runtime: {e}")))?;
    let name = args.plugin.strip_prefix("bundled:").unwrap_or(&args.plugin);
    let path = Path::new(&args.plugin);
    let plugin = if !args.plugin.starts_with("bundled:") && path.exists() {
        runtime.load_file(path, &Grants { outbound_hosts }).map_err(Failure::load)?
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

pub async fn run(cmd: PluginCommand) -> Result<(), Failure> {
    match cmd {
        PluginCommand::List => {
            for b in bundled::ALL {
                let m = mint_plugins::Manifest::parse(b.name, b.manifest).map_err(Failure::load)?;
                println!("{:<10} {:<12} {:<8} {}", m.name, m.kind, m.version, m.description);
            }
            Ok(())
        }
        PluginCommand::Inspect(args) => {
            let (_rt, p) = load(&args)?;
            let m = p.manifest();
            let out = json!({
                "name": m.name, "version": m.version, "kind": m.kind.as_str(),
                "wit": format!("mint:plugin@{}", m.wit),
                "world": format!("mint:plugin/{}-plugin", m.kind.as_str()),
                "description": m.description,
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
        .with_context(|| format!("--input {}: not a select, customize or driver fixture (see README)", args.input.display()))
        .map_err(Failure::usage)?;
    let extra: Option<Value> = match &args.config {
        None => None,
        Some(t) => Some(serde_json::from_str(t).context("--config is not JSON").map_err(Failure::usage)?),
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
            let c = plugin.select(&named.request, &named.names, overlay(&f.config).as_ref()).await.map_err(call_failure)?;
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
            let c = plugin.customize(&instance, peers, master, overlay(&f.config).as_ref()).await.map_err(call_failure)?;
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
                    (json!({"state": state_name(c.value.state), "detail": c.value.detail}), logs, us)
                }
                "undeploy" => {
                    let c = plugin.undeploy(&node, &d, config.as_ref()).await.map_err(call_failure)?;
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
