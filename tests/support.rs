//! Shared helpers: building the test guests once, loading plugins with inline manifests,
//! and small fixtures.

use mint_plugins::{Grants, LoadError, Manifest, Plugin, Runtime, RuntimeOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The `.wasm` of test guest `name` (a directory of tests/guests), built on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let target = BUILT.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("wasm-guests");
        let ws = root().join("tests/guests");
        for g in [
            "panic",
            "spin",
            "memory-bomb",
            "flood",
            "bad-answer",
            "peers",
            "http-driver",
            "wit-v1",
            "compat-0-1-0",
            "versioned",
        ] {
            mint_guest_build::build_into(&ws, &format!("guest-{g}"), &target);
        }
        target
    });
    target
        .join("wasm32-wasip2/release")
        .join(format!("guest_{}.wasm", name.replace('-', "_")))
}

/// A fresh runtime without a compiled-code cache.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeOptions::default()).expect("runtime")
}

/// A manifest for a test plugin: `kind` and extra TOML lines (capabilities, config).
pub fn manifest(name: &str, kind: &str, extra: &str) -> Manifest {
    Manifest::parse(
        name,
        &format!(
            "name = \"{name}\"\nversion = \"0.0.0\"\nkind = \"{kind}\"\nwit = \"0.1.0\"\n{extra}"
        ),
    )
    .expect("test manifest")
}

/// Loads test guest `name` as a plugin of `kind`.
pub fn load_guest(rt: &Runtime, name: &str, kind: &str, extra: &str) -> Result<Plugin, LoadError> {
    load_guest_granted(rt, name, kind, extra, &Grants::default())
}

/// Loads test guest `name` with `grants`.
pub fn load_guest_granted(
    rt: &Runtime,
    name: &str,
    kind: &str,
    extra: &str,
    grants: &Grants,
) -> Result<Plugin, LoadError> {
    let bytes = std::fs::read(guest(name)).expect("guest built");
    rt.load(manifest(name, kind, extra), &bytes, name, grants)
}

/// A bundled plugin, loaded.
pub fn bundled(rt: &Runtime, name: &str) -> Plugin {
    rt.load_bundled(name).expect("bundled").expect("loads")
}

/// A scratch directory under the target directory, emptied.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Runs a future on a fresh runtime (tests use plain `#[test]` so each has its own).
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
        .block_on(f)
}

/// Starts `mint daemon` on an ephemeral loopback port with state in `data`, and returns the
/// process and the URL it says it serves on. Its stderr keeps being drained so it never
/// blocks on a full pipe.
pub fn start_daemon(data: &Path) -> (std::process::Child, String) {
    start_daemon_with(data, &[])
}

/// [`start_daemon`] with extra `mint daemon` arguments.
pub fn start_daemon_with(data: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let (child, url, _log) = crate::running::spawn_daemon(data, extra, "warn");
    (child, url)
}

/// The admin token a daemon with state in `data` wrote at its first start.
pub fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token"))
        .expect("the daemon's admin token")
        .trim()
        .to_string()
}

/// `Authorization` for the daemon with state in `data`, as its admin.
pub fn admin_auth(data: &Path) -> String {
    format!("Bearer {}", admin_token(data))
}

/// Enrolls node `name` at the daemon with state in `data` and registers it with the join
/// token, as an agent would; returns the node's credential.
pub fn join(url: &str, data: &Path, name: &str) -> String {
    let enrolled: serde_json::Value = ureq::post(&format!("{url}/v1/nodes/{name}/enroll"))
        .set("Authorization", &admin_auth(data))
        .send_json(serde_json::json!({}))
        .expect("enroll")
        .into_json()
        .unwrap();
    let join = enrolled["join-token"]
        .as_str()
        .expect("a join token")
        .to_string();
    let body = serde_json::json!({"name": name, "cpus": 4, "memory-mib": 8192, "arch": "x86_64", "agent-url": "http://127.0.0.1:9"});
    let registered: serde_json::Value = ureq::post(&format!("{url}/v1/agents/register"))
        .set("Authorization", &format!("Bearer {join}"))
        .send_json(body)
        .expect("register")
        .into_json()
        .unwrap();
    registered["credential"]
        .as_str()
        .expect("a credential")
        .to_string()
}

/// The Python node policy `plugins/python/least-loaded`, built with componentize-py from
/// the environment `cargo xtask setup` makes, on first use; its manifest is beside it.
pub fn python_policy() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let venv = crate::bmc::python_env(&root());
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-plugins");
            std::fs::create_dir_all(&out).expect("output dir");
            let src = root().join("plugins/python/least-loaded");
            let wasm = out.join("least-loaded.wasm");
            let o = std::process::Command::new(venv.join("bin/componentize-py"))
                .arg("-d")
                .arg(root().join("wit"))
                .args(["-w", "node-policy-plugin", "componentize", "-p"])
                .arg(&src)
                .arg("app")
                .arg("-o")
                .arg(&wasm)
                .output()
                .expect("run componentize-py");
            assert!(
                o.status.success(),
                "componentize-py: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::fs::copy(src.join("plugin.toml"), out.join("least-loaded.toml"))
                .expect("manifest");
            wasm
        })
        .clone()
}

/// A daemon with state in a new scratch directory `name`, the web tier
/// (`tests/fixtures/web-tier.toml`, K = 8, the noop driver) created from the ifupdown
/// fixture master, and six free nodes `n1`..`n6`; nothing deployed.
pub fn web_site(name: &str, extra: &[&str]) -> crate::running::Daemon {
    let dir = scratch(name);
    let d = crate::running::Daemon::start(&dir.join("data"), extra, &root());
    d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
    ]);
    d.mint(&["tier", "create", "-f", "tests/fixtures/web-tier.toml"]);
    for n in 1..=6 {
        d.mint(&[
            "node",
            "add",
            &format!("n{n}"),
            "--cpus",
            "4",
            "--memory-mib",
            "8192",
        ]);
    }
    d
}
