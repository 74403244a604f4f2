//! `mint demo`: runs every bundled plugin through the real loader and sandbox on example
//! inputs (a small Debian-like master, twelve nodes over three zones) and prints what each
//! decided. It shows the order mint works in: identities first, nodes after.

use crate::Failure;
use crate::plugin_cmd::{edit_path, state_name};
use anyhow::anyhow;
use clap::Args;
use mint_plugins::fixture::{NodeJson, RequirementsJson, SelectRequestJson, ip};
use mint_plugins::master::DirMaster;
use mint_plugins::types::{Artifact, Deployment, Instance, Node, Peer};
use mint_plugins::{Runtime, RuntimeOptions};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// How many instances to mint (K).
    #[arg(long, default_value_t = 5)]
    instances: u32,
    /// How many of them to place on nodes (M < K).
    #[arg(long, default_value_t = 3)]
    deploy: u32,
    /// Where to keep compiled plugins between runs.
    #[arg(long, default_value = "target/mint-demo/cache")]
    cache_dir: PathBuf,
}

fn write(root: &std::path::Path, path: &str, text: &str) -> std::io::Result<()> {
    let p = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap_or(root))?;
    std::fs::write(p, text)
}

pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    if args.deploy == 0 || args.deploy >= args.instances || args.instances > 250 {
        return Err(Failure::usage(anyhow!(
            "--deploy must be at least 1 and below --instances, and --instances at most 250"
        )));
    }
    let started = Instant::now();
    let rt = Runtime::new(RuntimeOptions {
        cache_dir: Some(args.cache_dir.clone()),
        ..Default::default()
    })
    .map_err(|e| Failure::load(anyhow!(e)))?;
    let mut plugins = BTreeMap::new();
    for name in ["spread", "hostname", "network", "noop"] {
        let t = Instant::now();
        let p = rt
            .load_bundled(name)
            .ok_or_else(|| Failure::load(anyhow!("{name} is not bundled")))?
            .map_err(Failure::load)?;
        println!(
            "loaded {name:<9} {:<12} ({:?}, {:.1} ms)",
            p.manifest().kind,
            p.code_source(),
            t.elapsed().as_secs_f64() * 1e3
        );
        plugins.insert(name, p);
    }

    // A small Debian-like master: ifupdown networking and a distribution /etc/hosts.
    let master_dir = args.cache_dir.join("../master");
    let m = |p, t| {
        write(&master_dir, p, t)
            .map_err(|e| Failure::usage(anyhow!("cannot write the demo master: {e}")))
    };
    m("/etc/hostname", "debian\n")?;
    m("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n")?;
    m(
        "/etc/network/interfaces",
        "auto eth0\niface eth0 inet dhcp\n",
    )?;
    m("/sbin/ifup", "")?;
    let master = Arc::new(DirMaster::new(&master_dir));

    println!(
        "\nminting {} instances of tier `web` before any node is chosen:",
        args.instances
    );
    let addr = |i: u32| Ipv4Addr::new(198, 18, 0, 10 + i as u8);
    let peers: Arc<[Peer]> = (0..args.instances)
        .map(|i| Peer {
            index: i,
            hostname: format!("web-{i:03}"),
            address: ip(addr(i).into()),
        })
        .collect::<Vec<_>>()
        .into();
    for i in 0..args.instances {
        let instance = Instance {
            tier: "web".into(),
            index: i,
            hostname: format!("web-{i:03}"),
            address: ip(addr(i).into()),
            prefix_len: 24,
            gateway: Some(ip(Ipv4Addr::new(198, 18, 0, 1).into())),
            dns: vec![ip(Ipv4Addr::new(198, 18, 0, 53).into())],
            peer_count: args.instances,
        };
        let mut files = Vec::new();
        for step in ["hostname", "network"] {
            let c = plugins[step]
                .customize(&instance, peers.clone(), master.clone(), None)
                .await
                .map_err(Failure::call)?;
            files.extend(c.value.iter().map(|e| edit_path(e).to_string()));
        }
        println!("  web-{i:03} {}/24  edits: {}", addr(i), files.join(" "));
    }

    let mut candidates = Vec::new();
    for (z, zone) in ["a", "b", "c"].iter().enumerate() {
        for n in 0..4u32 {
            candidates.push(NodeJson {
                name: format!("node-{zone}{n}"),
                cpus: 8,
                memory_mib: 16384,
                arch: "x86_64".into(),
                labels: BTreeMap::from([
                    ("zone".to_string(), zone.to_string()),
                    ("rack".to_string(), format!("{zone}-r{}", n / 2)),
                ]),
                load: (z as u32 * 130 + n * 70) % 1000,
            });
        }
    }
    let named = SelectRequestJson {
        tier: "web".into(),
        count: args.deploy,
        requirements: RequirementsJson::default(),
        placed: vec![],
        candidates,
    }
    .to_wit();
    let chosen = plugins["spread"]
        .select(&named.request, &named.names, None)
        .await
        .map_err(Failure::call)?;
    println!(
        "\nspread chose {} of {} nodes:",
        chosen.value.len(),
        named.names.len()
    );
    for (i, ch) in chosen.value.iter().enumerate() {
        let node_name = &named.names[ch.candidate as usize];
        let d = Deployment {
            tier: "web".into(),
            index: i as u32,
            hostname: format!("web-{i:03}"),
            artifact: Artifact {
                url: format!("http://127.0.0.1:7600/artifacts/web/{i}"),
                digest: String::new(),
                size: 0,
                format: "tree".into(),
            },
        };
        let n = Node {
            name: node_name.clone(),
            properties: vec![],
            labels: vec![],
        };
        let r = plugins["noop"]
            .deploy(&n, &d, None)
            .await
            .map_err(Failure::call)?;
        println!(
            "  web-{i:03} -> {:<8} {:<8} {}",
            node_name,
            state_name(r.value.state),
            ch.reason.as_deref().unwrap_or("")
        );
    }
    println!(
        "\n{} instances stay pooled with their identities for a later scale-out. Done in {:.0} ms.",
        args.instances - args.deploy,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
