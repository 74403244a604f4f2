//! Compiles guest crates for `wasm32-wasip2` from a build script, so that a plain
//! `cargo build` or `cargo test` of the engine also builds the plugins it bundles and the
//! guests its tests load.
//!
//! Guests build in their own workspaces and their own target directory: they want a
//! different target and profile, and a nested cargo must not wait on the outer one's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target guests build for.
pub const TARGET: &str = "wasm32-wasip2";

/// The directory guests build into: `<target-dir>/wasm-guests`, found from `OUT_DIR`
/// (`<target-dir>/<profile>/build/<crate>-<hash>/out`).
pub fn guest_target_dir() -> PathBuf {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    out.ancestors()
        .nth(4)
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out.join("wasm-guests"))
}

/// Fails the build with instructions when the wasm32-wasip2 standard library is missing.
pub fn require_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()));
    let present = sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).exists());
    if !present {
        panic!(
            "\n\nmint builds its plugins for {TARGET}, and this toolchain lacks that target.\n\
             Install it with:\n\n    rustup target add {TARGET}\n\n\
             (`bash .ci/run` and `cargo xtask setup` do this for you.)\n"
        );
    }
}

/// Builds package `package` of the guest workspace at `workspace` in release mode and
/// returns the path of its `.wasm`. Each package builds on its own so that the SDK's
/// per-kind features are not unified across plugins of different kinds.
pub fn build(workspace: &Path, package: &str) -> PathBuf {
    build_into(workspace, package, &guest_target_dir())
}

/// Like [`build`], into an explicit target directory (for callers outside build scripts).
pub fn build_into(workspace: &Path, package: &str, target_dir: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "--target",
        TARGET,
        "--package",
        package,
    ])
    .arg("--manifest-path")
    .arg(workspace.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir);
    // The outer build's flags are for the host target; none of them apply to guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build guest {package}: {e}"));
    if !status.success() {
        panic!("building guest {package} for {TARGET} failed (see the errors above)");
    }
    let file = package.replace('-', "_");
    target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{file}.wasm"))
}

/// Tells cargo to rerun the build script when anything under these paths changes.
pub fn rerun_if_changed(paths: &[PathBuf]) {
    for p in paths {
        println!("cargo::rerun-if-changed={}", p.display());
    }
}
