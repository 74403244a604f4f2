//! The commands and files README.md and docs/ show, run or parsed exactly as written, so a
//! command in the documentation cannot stop working without a test failing.
//!
//! Every fenced `sh`, `rust`, `toml` and `python` block of README.md and docs/*.md must be
//! claimed in [`CLAIMS`] by the test that checks it; an unclaimed block, or a claim whose
//! block is gone, fails `every_block_of_the_docs_is_checked`. Shell blocks run under
//! `bash -euo pipefail` in a scratch directory laid out as the text assumes (a mint
//! checkout, or a plugin crate beside one), with the built `mint` on `PATH`.

use crate::support::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A fenced code block of a documentation file.
#[derive(Debug, Clone)]
pub struct Block {
    /// The file, relative to the repository's root.
    pub file: String,
    /// The line of its opening fence.
    pub line: usize,
    /// Its info string (`sh`, `toml`, ...).
    pub lang: String,
    /// Its text.
    pub text: String,
}

impl Block {
    /// The block's first line, which claims name it by.
    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or_default()
    }
}

/// Which test checks each block: (file, language, the start of the block's first line, test).
const CLAIMS: &[(&str, &str, &str, &str)] = &[
    (
        "README.md",
        "sh",
        "cargo xtask daemon",
        "readme_main_command_and_quickstart",
    ),
    (
        "README.md",
        "sh",
        "mint=target/release/mint",
        "readme_main_command_and_quickstart",
    ),
    (
        "README.md",
        "toml",
        "[autoscale]",
        "configuration_blocks_parse",
    ),
    (
        "README.md",
        "toml",
        "[[endpoint]]",
        "configuration_blocks_parse",
    ),
    (
        "docs/blob-cache.md",
        "toml",
        "[artifacts]",
        "configuration_blocks_parse",
    ),
    (
        "README.md",
        "toml",
        "[deploy]",
        "configuration_blocks_parse",
    ),
    (
        "docs/netboot.md",
        "toml",
        "[netboot]",
        "configuration_blocks_parse",
    ),
    (
        "README.md",
        "sh",
        "$mint token create",
        "readme_identity_commands",
    ),
    (
        "README.md",
        "toml",
        "name = \"my-policy\"",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "README.md",
        "sh",
        "$mint plugin install acme-redfish",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "README.md",
        "toml",
        "[plugins]",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "README.md",
        "toml",
        "# bmc-credentials.toml",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "README.md",
        "rust",
        "use mint_sdk::customizer",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "README.md",
        "sh",
        "cargo build --release --target wasm32-wasip2",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "toml",
        "# Cargo.toml",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "rust",
        "use mint_sdk::policy",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "sh",
        "mint plugin pack",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "toml",
        "# mint.toml",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "sh",
        "mint plugin install my-policy",
        "plugin_authors_build_pack_sign_and_install_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "sh",
        "pip install componentize-py",
        "python_policies_build_and_run_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "python",
        "from componentize_py_types",
        "python_policies_build_and_run_as_documented",
    ),
    (
        "docs/plugin-authors.md",
        "sh",
        "cp plugins/python/least-loaded/plugin.toml",
        "python_policies_build_and_run_as_documented",
    ),
];

/// The documentation files whose blocks are checked.
fn doc_files() -> Vec<String> {
    let mut files = vec!["README.md".to_string(), "ARCHITECTURE.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .filter(|n| n.ends_with(".md"))
                .map(|n| format!("docs/{n}"))
        })
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Every fenced block of `file` in one of the checked languages.
pub fn blocks(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (n, line) in text.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    file: file.into(),
                    line: n + 1,
                    lang: info.trim().into(),
                    text: String::new(),
                })
            }
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some(b), None) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "{file}: a code fence is never closed");
    out.retain(|b| ["sh", "rust", "toml", "python"].contains(&b.lang.as_str()));
    out
}

/// The block of `file` in `lang` whose first line starts with `start`, which must be claimed
/// by `test`.
fn block(file: &str, lang: &str, start: &str, test: &str) -> Block {
    assert!(
        CLAIMS.contains(&(file, lang, start, test)),
        "claim ({file:?}, {lang:?}, {start:?}, {test:?}) is missing from CLAIMS"
    );
    let found: Vec<Block> = blocks(file)
        .into_iter()
        .filter(|b| b.lang == lang && b.first_line().starts_with(start))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{file} should have exactly one {lang} block starting with {start:?}"
    );
    found.into_iter().next().unwrap()
}

#[test]
fn every_block_of_the_docs_is_checked() {
    let mut unclaimed = Vec::new();
    let mut used = vec![false; CLAIMS.len()];
    for file in doc_files() {
        for b in blocks(&file) {
            let claims: Vec<usize> = (0..CLAIMS.len())
                .filter(|&i| {
                    CLAIMS[i].0 == b.file
                        && CLAIMS[i].1 == b.lang
                        && b.first_line().starts_with(CLAIMS[i].2)
                })
                .collect();
            match claims.as_slice() {
                [i] => used[*i] = true,
                [] => unclaimed.push(format!(
                    "{}:{} ({}) `{}`",
                    b.file,
                    b.line,
                    b.lang,
                    b.first_line()
                )),
                many => panic!("{}:{} is claimed {} times", b.file, b.line, many.len()),
            }
        }
    }
    assert!(
        unclaimed.is_empty(),
        "blocks no test checks; add a test and a claim in tests/docs.rs:\n{}",
        unclaimed.join("\n")
    );
    let stale: Vec<_> = CLAIMS
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(c, _)| c)
        .collect();
    assert!(stale.is_empty(), "claims whose block is gone: {stale:?}");
}

/// The environment a user's shell would have: no variables cargo sets for the test process,
/// the built `mint` first on `PATH`, then `extra_path`.
fn user_command(program: &str, cwd: &Path, extra_path: &[PathBuf]) -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_mint"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut path = vec![bin];
    path.extend(extra_path.iter().cloned());
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let mut c = Command::new(program);
    c.env_clear()
        .current_dir(cwd)
        .env("PATH", std::env::join_paths(path).expect("PATH"));
    for keep in [
        "HOME",
        "LANG",
        "TMPDIR",
        "RUSTUP_HOME",
        "CARGO_HOME",
        "RUSTUP_TOOLCHAIN",
        "USER",
    ] {
        if let Some(v) = std::env::var_os(keep) {
            c.env(keep, v);
        }
    }
    c
}

/// Waits for `child` at most `limit`, killing it past that; returns its output.
fn finish(mut child: Child, what: &str, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let o = child.wait_with_output().expect("output");
                panic!(
                    "{what} did not finish within {limit:?}:\n{}\n{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Runs a shell block in `cwd` with `env` set, and returns what it printed; fails the
/// test, with the block's place and output, if any command of it fails.
fn run_block(
    b: &Block,
    cwd: &Path,
    env: &[(&str, &str)],
    extra_path: &[PathBuf],
    limit: Duration,
) -> String {
    let mut c = user_command("bash", cwd, extra_path);
    c.args(["-euo", "pipefail", "-x", "-c", &b.text])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = finish(
        c.spawn().expect("bash"),
        &format!("the block at {}:{}", b.file, b.line),
        limit,
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "the block at {}:{} failed ({}):\n{out}\n{err}",
        b.file,
        b.line,
        o.status
    );
    out
}

/// A directory that looks like a mint checkout to the blocks that assume one: `tests`,
/// `wit` and `plugins` from the repository, and `target/release/mint` (the built binary).
fn checkout_like(dir: &Path) {
    for d in ["tests", "wit", "plugins"] {
        std::os::unix::fs::symlink(root().join(d), dir.join(d)).expect("symlink");
    }
    std::fs::create_dir_all(dir.join("target/release")).expect("target/release");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mint"), dir.join("target/release/mint"))
        .expect("symlink mint");
}

/// A process started in its own process group, stopped (SIGTERM to the group) when
/// dropped, so nothing it started outlives the test.
struct Group(Option<Child>);

impl Group {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        // SAFETY: signalling a process group this test created.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        None
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts README's main command, `cargo xtask daemon`, as a user types it (plus a scratch
/// state directory and an ephemeral loopback port) and returns it with the URL it serves.
fn xtask_daemon(
    command: &str,
    data: &Path,
) -> (Group, String, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::os::unix::process::CommandExt;
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut c = user_command(words[0], &root(), &[]);
    c.args(&words[1..])
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0);
    let mut child = c.spawn().expect("start cargo xtask daemon");
    let stderr = child.stderr.take().expect("piped");
    let group = Group(Some(child));
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving ").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            kept.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    // The workspace is built already (this test is part of it), so this is the time to
    // check that it is up to date and start; a rebuild would show as a timeout here.
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(url) => (group, url, log),
        Err(_) => panic!(
            "`{command}` did not serve within 600 s:\n{}",
            log.lock().unwrap()
        ),
    }
}

#[test]
fn readme_main_command_and_quickstart() {
    let main = block(
        "README.md",
        "sh",
        "cargo xtask daemon",
        "readme_main_command_and_quickstart",
    );
    let mut lines = main
        .text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim());
    let (daemon_cmd, test_cmd) = (lines.next().unwrap(), lines.next().unwrap());
    assert_eq!(daemon_cmd, "cargo xtask daemon");
    // The other command is the one CI runs: .ci/run must call exactly it.
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test_cmd),
        ".ci/run does not run README's test command `{test_cmd}`"
    );

    let dir = scratch("docs-quickstart");
    let data = dir.join("data");
    let started = Instant::now();
    let (mut daemon, url, log) = xtask_daemon(daemon_cmd, &data);
    eprintln!(
        "`{daemon_cmd}` served {url} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let health: serde_json::Value = ureq::get(&format!("{url}/v1/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok");

    let quick = block(
        "README.md",
        "sh",
        "mint=target/release/mint",
        "readme_main_command_and_quickstart",
    );
    let cwd = dir.join("checkout");
    std::fs::create_dir_all(&cwd).unwrap();
    checkout_like(&cwd);
    let out = run_block(
        &quick,
        &cwd,
        &[("MINT_SERVER", &url)],
        &[],
        Duration::from_secs(300),
    );
    assert!(
        out.contains("tier web created: 8 instances minted in 198.18.0.0/24"),
        "{out}"
    );
    assert!(
        out.contains("tier web scaled to 3: deployed [web/0 web/1 web/2]"),
        "{out}"
    );
    assert!(out.contains("re-minted at revision 1"), "{out}");
    assert!(out.contains("tier web deleted"), "{out}");
    // Below the materialize root `cargo xtask daemon` configured in the data directory.
    assert_eq!(
        std::fs::read_to_string(data.join("materialized/web-002/etc/hostname"))
            .unwrap()
            .trim(),
        "web-002"
    );
    assert!(!cwd.join("web-002").exists());
    // The quickstart's last command collected both masters once the tier was gone.
    let images: serde_json::Value = ureq::get(&format!("{url}/v1/images"))
        .set("Authorization", &admin_auth(&data))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(images, serde_json::json!([]), "{out}");

    let status = daemon.stop().expect("the daemon stops on SIGTERM");
    assert!(
        status.success(),
        "the daemon exited with {status}: {}",
        log.lock().unwrap()
    );
    assert!(
        data.join("state").is_dir(),
        "state is in the --data-dir given"
    );
}

#[test]
fn readme_demo_command() {
    let o = finish(
        user_command("cargo", &root(), &[])
            .args(["xtask", "demo"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cargo xtask demo"),
        "cargo xtask demo",
        Duration::from_secs(600),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("minting 5 instances of tier `web` before any node is chosen"),
        "{out}"
    );
    assert!(out.contains("spread chose 3 of 12 nodes"), "{out}");
}

#[test]
fn configuration_blocks_parse() {
    // README's load rule, in the quickstart's tier: a tier that checks out.
    let rule = block(
        "README.md",
        "toml",
        "[autoscale]",
        "configuration_blocks_parse",
    );
    let tier = std::fs::read_to_string(root().join("tests/fixtures/web-tier.toml")).unwrap();
    let digest = format!("sha256:{}", "0".repeat(64));
    let text = format!(
        "{}\n{}",
        tier.replace("\"debian\"", &format!("\"{digest}\"")),
        rule.text
    );
    let spec: mint_core::TierSpec =
        toml::from_str(&text).unwrap_or_else(|e| panic!("README.md:{}: {e}", rule.line));
    let tier = spec
        .to_tier()
        .unwrap_or_else(|e| panic!("README.md:{}: {e}", rule.line));
    assert_eq!(tier.autoscale.map(|a| a.max), Some(Some(6)));
    // README's BMC trust entries: a configuration the daemon accepts.
    let endpoints = block(
        "README.md",
        "toml",
        "[[endpoint]]",
        "configuration_blocks_parse",
    );
    let config =
        mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &endpoints.text)
            .unwrap_or_else(|e| panic!("README.md:{}: {e}", endpoints.line));
    assert_eq!(
        config.endpoint_tls.summary().len(),
        3,
        "README.md:{}",
        endpoints.line
    );
    // The blob cache's setting: a configuration the daemon accepts, naming the cache.
    let cache = block(
        "docs/blob-cache.md",
        "toml",
        "[artifacts]",
        "configuration_blocks_parse",
    );
    let config = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &cache.text)
        .unwrap_or_else(|e| panic!("docs/blob-cache.md:{}: {e}", cache.line));
    assert_eq!(
        config.blob_base.as_deref(),
        Some("https://cache.example:8443"),
        "docs/blob-cache.md:{}",
        cache.line
    );
    // The deploy ISO's setting: refused while the file is not a bootable ISO (naming how
    // to build one), taken once it is.
    let deploy = block(
        "README.md",
        "toml",
        "[deploy]",
        "configuration_blocks_parse",
    );
    let e = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &deploy.text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deploy.iso") && e.contains("cargo xtask deploy-iso"),
        "README.md:{}: {e}",
        deploy.line
    );
    let dir = crate::support::scratch("docs-deploy-iso");
    crate::running::tiny_iso(&dir.join("deploy.iso"));
    let text = deploy.text.replace(
        "/var/lib/mint/deploy.iso",
        dir.join("deploy.iso").to_str().unwrap(),
    );
    let config = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &text)
        .unwrap_or_else(|e| panic!("README.md:{}: {e}", deploy.line));
    assert_eq!(
        config.deploy_iso.as_deref(),
        Some(dir.join("deploy.iso").as_path())
    );
    // Network boot: refused while the boot stage is missing (naming how to build it),
    // taken once it is there.
    let netboot = block(
        "docs/netboot.md",
        "toml",
        "[netboot]",
        "configuration_blocks_parse",
    );
    let e = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &netboot.text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("netboot.stage") && e.contains("cargo xtask boot-stage"),
        "docs/netboot.md:{}: {e}",
        netboot.line
    );
    std::fs::write(dir.join("boot-stage.cpio"), b"070701").unwrap();
    let text = netboot.text.replace(
        "/var/lib/mint/boot-stage.cpio",
        dir.join("boot-stage.cpio").to_str().unwrap(),
    );
    let config = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &text)
        .unwrap_or_else(|e| panic!("docs/netboot.md:{}: {e}", netboot.line));
    assert_eq!(
        config.netboot.listen,
        Some("198.18.0.1:8081".parse().unwrap()),
        "docs/netboot.md:{}",
        netboot.line
    );
    assert!(config.netboot.check_source);
    let bad = text.replace("198.18.0.1:8081", "198.18.0.1");
    let e = mint_daemon::config::Config::parse(Path::new("/etc/mint/mint.toml"), &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("netboot.listen") && e.contains("ADDRESS:PORT"),
        "{e}"
    );
}

/// Runs a shell block one line at a time (each as written, in its own `bash`), feeding
/// `stdin(line)` to the lines it gives text for: minisign reads its password from standard
/// input and would swallow the next command's too.
fn run_lines(
    b: &Block,
    cwd: &Path,
    env: &[(&str, &str)],
    stdin: impl Fn(&str) -> Option<String>,
) -> String {
    use std::io::Write;
    let mut out = String::new();
    for line in b
        .text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        let mut c = user_command("bash", cwd, &[]);
        c.args(["-euo", "pipefail", "-c", line])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("bash");
        let mut input = child.stdin.take().expect("piped");
        if let Some(text) = stdin(line) {
            input.write_all(text.as_bytes()).expect("stdin");
        }
        drop(input);
        let o = finish(
            child,
            &format!("`{line}` ({}:{})", b.file, b.line),
            Duration::from_secs(120),
        );
        let (so, se) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(
            o.status.success(),
            "`{line}` of the block at {}:{} failed ({}):\n{so}\n{se}",
            b.file,
            b.line,
            o.status
        );
        out.push_str(&so);
    }
    out
}

/// The public key a minisign `.pub` file holds (its second line).
fn public_key(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .nth(1)
        .expect("a minisign public key file has two lines")
        .trim()
        .to_string()
}

#[test]
fn plugin_authors_build_pack_sign_and_install_as_documented() {
    const T: &str = "plugin_authors_build_pack_sign_and_install_as_documented";
    // The layout the docs assume: a mint checkout in `mint/`, each plugin crate beside it.
    let ws = scratch("docs-authors");
    std::os::unix::fs::symlink(root(), ws.join("mint")).unwrap();
    let cargo_toml = block("docs/plugin-authors.md", "toml", "# Cargo.toml", T).text;
    let manifest = block("README.md", "toml", "name = \"my-policy\"", T).text;
    // One target directory for both crates (each crate's `target` points at it), so their
    // dependencies build once; the repository's lock file pins the versions the SDK is
    // tested with.
    let shared = ws.join("shared-target");
    std::fs::create_dir_all(&shared).unwrap();
    let krate = |name: &str, feature: &str, lib: &Block| -> PathBuf {
        let d = ws.join(name);
        std::fs::create_dir_all(d.join("src")).unwrap();
        let deps = cargo_toml.replace(
            "features = [\"policy\"]",
            &format!("features = [\"{feature}\"]"),
        );
        // `[workspace]`: the crate is its own workspace, not a member of the repository's
        // (whose target directory holds this scratch directory).
        let text = format!(
            "[package]\nname = \"{name}\"\nversion = \"1.0.0\"\nedition = \"2024\"\n\n{deps}\n[workspace]\n"
        );
        std::fs::write(d.join("Cargo.toml"), text).unwrap();
        std::fs::write(d.join("src/lib.rs"), &lib.text).unwrap();
        std::fs::copy(root().join("plugins/Cargo.lock"), d.join("Cargo.lock")).unwrap();
        std::os::unix::fs::symlink(&shared, d.join("target")).unwrap();
        d
    };

    // README's customizer, built and run as README's block says.
    let motd = krate(
        "motd",
        "customizer",
        &block("README.md", "rust", "use mint_sdk::customizer", T),
    );
    let motd_manifest = manifest
        .replace("name = \"my-policy\"", "name = \"motd\"")
        .replace("kind = \"node-policy\"", "kind = \"customizer\"");
    std::fs::write(motd.join("plugin.toml"), motd_manifest).unwrap();
    let writing = block(
        "README.md",
        "sh",
        "cargo build --release --target wasm32-wasip2",
        T,
    );
    let out = run_block(&writing, &motd, &[], &[], Duration::from_secs(900));
    assert!(
        out.contains("/etc/motd") && out.contains("Welcome to web-004"),
        "the customizer's edit: {out}"
    );
    assert!(
        out.contains("\"world\": \"mint:plugin/customizer-plugin\""),
        "inspect of the component: {out}"
    );

    // The guide's policy, built as the guide says, then packed and signed by its vendor.
    let policy = krate(
        "my-policy",
        "policy",
        &block("docs/plugin-authors.md", "rust", "use mint_sdk::policy", T),
    );
    let vendor_manifest = manifest.replacen(
        "version = \"0.1.0\"\n",
        "version = \"0.1.0\"\nvendor = \"acme\"\n",
        1,
    );
    assert_ne!(
        vendor_manifest, manifest,
        "README's manifest example has a `version = \"0.1.0\"` line"
    );
    std::fs::write(policy.join("plugin.toml"), &vendor_manifest).unwrap();
    let o = finish(
        user_command("cargo", &policy, &[])
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "cargo build of my-policy",
        Duration::from_secs(600),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let password = "correct horse battery staple\n";
    let pack = block("docs/plugin-authors.md", "sh", "mint plugin pack", T);
    run_lines(&pack, &policy, &[], |line| match line {
        l if l.starts_with("minisign -G") => Some(password.repeat(2)),
        l if l.starts_with("minisign -S") => Some(password.into()),
        _ => None,
    });
    let key = public_key(&policy.join("acme.pub"));

    // The operator's configuration: README's mint.toml and credentials file, trusting the
    // vendor key just made in place of the example's.
    let example_key = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3";
    let config_block = block("README.md", "toml", "[plugins]", T);
    assert!(config_block.text.contains(example_key));
    let etc = ws.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let materialized = ws.join("materialized");
    let config_text = config_block
        .text
        .replace(example_key, &key)
        .replace("/srv/mint/materialized", materialized.to_str().unwrap());
    std::fs::write(etc.join("mint.toml"), config_text).unwrap();
    // A password to look for afterwards, in place of README's `...`.
    let bmc_password = "docs-bmc-password-7f3a";
    let credentials = block("README.md", "toml", "# bmc-credentials.toml", T);
    assert!(credentials.text.contains("password = \"...\""));
    std::fs::write(
        etc.join("bmc-credentials.toml"),
        credentials.text.replace(
            "password = \"...\"",
            &format!("password = \"{bmc_password}\""),
        ),
    )
    .unwrap();
    let guide_config = block("docs/plugin-authors.md", "toml", "# mint.toml", T);
    mint_daemon::config::Config::parse(
        Path::new("mint.toml"),
        &guide_config.text.replace(example_key, &key),
    )
    .unwrap_or_else(|e| panic!("docs/plugin-authors.md:{}: {e}", guide_config.line));
    let config = etc.join("mint.toml");
    let daemon = crate::running::Daemon::start(
        &ws.join("data"),
        &["--config", config.to_str().unwrap()],
        &ws,
    );
    assert!(
        materialized.is_dir(),
        "README's configuration sets the materialize root, made at start"
    );

    let install = block(
        "docs/plugin-authors.md",
        "sh",
        "mint plugin install my-policy",
        T,
    );
    let out = run_block(
        &install,
        &policy,
        &[("MINT_SERVER", &daemon.url)],
        &[],
        Duration::from_secs(120),
    );
    assert!(
        out.contains(
            "installed plugin `my-policy` 0.1.0 (node-policy, mint:plugin@0.1.2), signed by acme"
        ),
        "{out}"
    );
    assert!(
        out.contains("\"kind\": \"node-policy\"")
            && out.contains(&key_id_of(&policy.join("acme.pub"))),
        "{out}"
    );

    // README's package commands, on a driver the same vendor ships: the bundled Redfish
    // driver's component under the vendor's name, with the outbound hosts README grants it.
    let redfish = mint_plugins::bundled::ALL
        .iter()
        .find(|b| b.name == "redfish")
        .expect("bundled redfish");
    let vendor = ws.join("vendor");
    std::fs::create_dir_all(&vendor).unwrap();
    // The vendor's own name and version, whatever the bundled driver's version is.
    let versioned: String = redfish
        .manifest
        .lines()
        .map(|l| {
            if l.starts_with("version = ") {
                "version = \"2.1.0\"\nvendor = \"acme\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let driver_manifest = (versioned + "\n")
        .replace("name = \"redfish\"", "name = \"acme-redfish\"")
        .replace(
            "[capabilities]\n",
            "[capabilities]\nallowed-outbound-hosts = [\"https://*.bmc.example.net\"]\n",
        );
    std::fs::write(vendor.join("plugin.toml"), driver_manifest).unwrap();
    std::fs::write(vendor.join("plugin.wasm"), redfish.wasm).unwrap();
    let secret = policy.join("acme.key");
    let sh = |cmd: &str, stdin: Option<&str>| {
        let b = Block {
            file: "tests/docs.rs".into(),
            line: line!() as usize,
            lang: "sh".into(),
            text: format!("{cmd}\n"),
        };
        run_lines(&b, &vendor, &[], |_| stdin.map(str::to_string));
    };
    sh(
        "mint plugin pack --manifest plugin.toml --wasm plugin.wasm -o acme-redfish-2.1.0.mintpkg",
        None,
    );
    sh(
        &format!(
            "minisign -Sm acme-redfish-2.1.0.mintpkg -s {}",
            secret.display()
        ),
        Some(password),
    );
    let packages = block("README.md", "sh", "$mint plugin install acme-redfish", T);
    let out = run_block(
        &packages,
        &vendor,
        &[("MINT_SERVER", &daemon.url), ("mint", "mint")],
        &[],
        Duration::from_secs(120),
    );
    assert!(
        out.contains("installed plugin `acme-redfish` 2.1.0 (driver"),
        "{out}"
    );
    assert!(
        out.contains("acme-redfish") && out.contains("removed plugin `acme-redfish`"),
        "{out}"
    );
    // The credentials never reach an answer or the daemon's log.
    assert!(!out.contains(bmc_password) && !daemon.log.lock().unwrap().contains(bmc_password));
    assert!(
        daemon
            .log
            .lock()
            .unwrap()
            .contains("endpoint https://10.1.0.17:443 as `admin`"),
        "the credentials were read: {}",
        daemon.log.lock().unwrap()
    );
}

/// The key ID minisign prints for a public key file (its comment's last word).
fn key_id_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn python_policies_build_and_run_as_documented() {
    const T: &str = "python_policies_build_and_run_as_documented";
    let venv_bin = crate::bmc::python_env(&root()).join("bin");
    let dir = scratch("docs-python");
    checkout_like(&dir);
    let build = block(
        "docs/plugin-authors.md",
        "sh",
        "pip install componentize-py",
        T,
    );
    run_block(
        &build,
        &dir,
        &[],
        std::slice::from_ref(&venv_bin),
        Duration::from_secs(600),
    );
    assert!(dir.join("gen").is_dir(), "the bindings to read");
    let run = block(
        "docs/plugin-authors.md",
        "sh",
        "cp plugins/python/least-loaded/plugin.toml",
        T,
    );
    let out = run_block(&run, &dir, &[], &[], Duration::from_secs(300));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let chosen: Vec<&str> = v["chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    // The lowest loads among the eligible: zone c lacks the pool label, b1-2 has 2 cpus.
    assert_eq!(chosen, ["a1-1", "a2-1", "b1-1"]);

    // The guide's sketch of a policy, componentized the same way, chooses as it says: the
    // first candidates with enough cpus.
    let sketch = block(
        "docs/plugin-authors.md",
        "python",
        "from componentize_py_types",
        T,
    );
    std::fs::create_dir_all(dir.join("sketch")).unwrap();
    std::fs::write(dir.join("sketch/app.py"), &sketch.text).unwrap();
    let manifest =
        std::fs::read_to_string(root().join("plugins/python/least-loaded/plugin.toml")).unwrap();
    std::fs::write(
        dir.join("sketch.toml"),
        manifest.replace("name = \"least-loaded\"", "name = \"sketch\""),
    )
    .unwrap();
    let b = Block {
        file: sketch.file.clone(),
        line: sketch.line,
        lang: "sh".into(),
        text: "componentize-py -d wit -w node-policy-plugin componentize -p sketch app -o sketch.wasm\nmint plugin run sketch.wasm --input tests/fixtures/select.json\n".into(),
    };
    let out = run_block(
        &b,
        &dir,
        &[],
        std::slice::from_ref(&venv_bin),
        Duration::from_secs(300),
    );
    // componentize-py reports on stdout too; the call's answer is the JSON after it.
    let json = &out[out.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
    let chosen: Vec<&str> = v["chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    assert_eq!(chosen, ["a1-1", "a2-1", "b1-1"]);
}

#[test]
fn readme_identity_commands() {
    use std::os::unix::fs::PermissionsExt;
    let b = block(
        "README.md",
        "sh",
        "$mint token create",
        "readme_identity_commands",
    );
    let dir = scratch("docs-identities");
    let daemon = crate::running::Daemon::start(&dir.join("data"), &[], &dir);
    let out = run_block(
        &b,
        &dir,
        &[("MINT_SERVER", &daemon.url), ("mint", "mint")],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.contains("token ci revoked"), "{out}");
    for file in ["ci.token", "join.token"] {
        let meta = std::fs::metadata(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
    }
    let ci = std::fs::read_to_string(dir.join("ci.token")).unwrap();
    assert!(
        ci.starts_with("mint_op_") && !out.contains(ci.trim()),
        "the token went to the file only"
    );
    let events = daemon.mint(&["events"]).to_string();
    assert!(
        events.contains("node `rack1-n03` may join once") && events.contains("token `ci` revoked"),
        "{events}"
    );
}
