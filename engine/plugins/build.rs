//! Builds the first-party plugins in `plugins/` for wasm32-wasip2 and generates the table
//! that bundles them (component and manifest) into the engine.

use std::path::PathBuf;

/// Each bundled plugin's name and directory; its package is `mint-<name>`, except where
/// that name is the engine's own (the `agent` driver's package is `mint-agent-driver`).
const PLUGINS: &[&str] = &[
    "spread",
    "binpack",
    "hostname",
    "network",
    "hosts",
    "ssh-keys",
    "files",
    "cloud-init",
    "noop",
    "agent",
    "redfish",
];

fn package(plugin: &str) -> String {
    match plugin {
        "agent" => "mint-agent-driver".into(),
        p => format!("mint-{p}"),
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../..");
    let plugins = root.join("plugins");
    let mut watch = vec![
        plugins.join("Cargo.toml"),
        plugins.join("Cargo.lock"),
        root.join("sdk/src"),
        root.join("sdk/Cargo.toml"),
        root.join("wit"),
    ];
    for p in PLUGINS {
        watch.push(plugins.join(p));
    }
    mint_guest_build::rerun_if_changed(&watch);
    mint_guest_build::require_target();

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut table =
        String::from("/// The plugins built into the engine.\npub const ALL: &[Bundled] = &[\n");
    for p in PLUGINS {
        let wasm = mint_guest_build::build(&plugins, &package(p));
        let dest = out.join(format!("{p}.wasm"));
        std::fs::copy(&wasm, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", wasm.display()));
        let manifest = plugins.join(p).join("plugin.toml");
        table.push_str(&format!(
            "    Bundled {{ name: {p:?}, manifest: include_str!({:?}), wasm: include_bytes!({:?}) }},\n",
            manifest.canonicalize().unwrap().display().to_string(),
            dest.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("bundled.rs"), table).unwrap();
}
