//! Project tasks, run as `cargo xtask <task>`: `setup` installs what a fresh clone needs,
//! `demo` runs mint's main job, `test` runs every test, `bench` runs the benchmarks.

use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed with {status}")) }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Installs the wasm32-wasip2 target when the toolchain lacks it.
fn setup() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("cannot run rustup (mint needs rustup to add the {WASM_TARGET} target): {e}"))?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == WASM_TARGET) {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

fn test() -> Result<(), String> {
    setup()?;
    // The host workspace in the release profile, which the benchmarks and the binary share,
    // so a cold run compiles wasmtime once.
    run(cargo().args(["test", "--release", "--workspace", "--exclude", "xtask"]))?;
    // The SDK and the first-party plugins, natively: their unit tests need no engine.
    for manifest in ["sdk/Cargo.toml", "plugins/Cargo.toml"] {
        let mut c = cargo();
        c.args(["test", "--manifest-path", manifest, "--target-dir", "target/guest-native"]);
        if manifest.starts_with("sdk") {
            c.arg("--all-features");
        }
        run(&mut c)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("demo") => setup().and_then(|_| run(cargo().args(["run", "--release", "--package", "mint", "--", "demo"]).args(&args[1..]))),
        Some("test") => test(),
        Some("bench") => setup().and_then(|_| run(cargo().args(["bench", "--package", "mint-plugins", "--bench", "plugin_cost", "--"]).args(&args[1..]))),
        _ => Err("usage: cargo xtask <setup | demo | test | bench>".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
