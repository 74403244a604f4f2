//! Project tasks, run as `cargo xtask <task>`: `setup` installs what a fresh clone needs,
//! `daemon` runs mint's main job (the daemon on its embedded store), `demo` shows the
//! bundled plugins at work, `test` runs every test, `bench` runs the benchmarks,
//! `deploy-iso` builds the deploy ISO BMCs boot to write disk masters (`deploy_iso.rs`),
//! `boot-stage` the initramfs network-booted nodes become their instances with
//! (`boot_stage.rs`).

mod boot_stage;
mod deploy_iso;

use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-wasip2";

/// A command as a shell would show it (without the environment it is given).
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {}", shown(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {}: {e}", shown(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed with {status}", shown(cmd)))
    }
}

/// A `cargo` command without the variables cargo sets for the program it runs (this task,
/// or a test that runs it). Build scripts watch some of them (ring's watches
/// `CARGO_MANIFEST_DIR`), so inheriting them would make a build from here recompile what a
/// build from the shell compiled, and the other way round.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .contains(&key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if set_by_cargo {
            c.env_remove(key);
        }
    }
    c
}

/// The Debian packages the tests use, each with a file that shows it is installed:
/// cloud-init (its own parsers read mint's NoCloud seeds), mtools (reads the seeds' FAT
/// volumes without mint's code), minisign, nginx (the HTTP cache the delivery tests put in
/// front of the engine), and what builds and boots the real test master (mmdebstrap,
/// syslinux, dosfstools, fdisk, QEMU), and what network boots test (dnsmasq's DHCP, QEMU's
/// iPXE ROMs) and confines agent instances (crun), and the distributed store: etcd's
/// server for the tests' clusters, and `protoc`, which the etcd client's build needs.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("cloud-init", "/usr/bin/cloud-init"),
    ("mtools", "/usr/bin/mcopy"),
    ("minisign", "/usr/bin/minisign"),
    ("nginx", "/usr/sbin/nginx"),
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    ("syslinux", "/usr/bin/syslinux"),
    ("syslinux-common", "/usr/lib/syslinux/mbr/mbr.bin"),
    ("dosfstools", "/usr/sbin/mkfs.vfat"),
    ("fdisk", "/usr/sbin/sfdisk"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("qemu-utils", "/usr/bin/qemu-img"),
    ("curl", "/usr/bin/curl"),
    ("isolinux", "/usr/lib/ISOLINUX/isolinux.bin"),
    ("xorriso", "/usr/bin/xorriso"),
    ("squashfs-tools", "/usr/bin/mksquashfs"),
    ("python3-venv", "/usr/lib/python3.11/ensurepip/__init__.py"),
    ("kmod", "/usr/sbin/depmod"),
    ("libvirt-daemon", "/usr/sbin/libvirtd"),
    (
        "libvirt-daemon-driver-qemu",
        "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
    ),
    ("libvirt-clients", "/usr/bin/virsh"),
    (
        "python3-libvirt",
        "/usr/lib/python3/dist-packages/libvirt.py",
    ),
    ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    ("ipxe-qemu", "/usr/lib/ipxe/qemu/efi-virtio.rom"),
    ("crun", "/usr/bin/crun"),
    ("etcd-server", "/usr/bin/etcd"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    // protoc's well-known types (google/protobuf/*.proto), which etcd's protocol imports;
    // protobuf-compiler only recommends them.
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    ("prometheus", "/usr/bin/promtool"),
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
];

/// Installs the [`DEBIAN_PACKAGES`] that are missing. The packages' services are kept from
/// starting: nothing may listen that a test did not start.
fn debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, file)| !std::path::Path::new(file).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        // Debian's maintainer scripts ask /usr/sbin/policy-rc.d whether they may start a
        // service; 101 says no. One that exists already is the machine's own and stays.
        let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
        let ours = !policy.exists()
            && std::fs::write(
                policy,
                "#!/bin/sh\n# mint setup: no service starts while packages install\nexit 101\n",
            )
            .is_ok();
        if ours {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
        }
        let done = run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        done
    };
    install()
        .or_else(|_| run(Command::new("apt-get").args(["update", "-q"])).and_then(|_| install()))
        .map_err(|e| {
            format!(
                "{e}; the tests need Debian's {} (apt-get install {})",
                missing.join(", "),
                missing.join(" ")
            )
        })
}

/// The Python tools the tests run (tests/python-requirements.txt), in a virtual
/// environment under target/mint-py, installed again when the requirements change. The
/// environment is Debian's Python's, seeing its system packages, because sushy-tools'
/// libvirt backend needs the libvirt binding Debian builds against its libvirt
/// (python3-libvirt); an environment made otherwise is made again.
fn python_tools() -> Result<(), String> {
    let venv = std::path::Path::new("target/mint-py");
    let wanted = std::fs::read_to_string("tests/python-requirements.txt")
        .map_err(|e| format!("tests/python-requirements.txt: {e}"))?;
    let stamp = venv.join("requirements.installed");
    let system = "/usr/bin/python3";
    let sees_system = std::fs::read_to_string(venv.join("pyvenv.cfg"))
        .is_ok_and(|c| c.contains("include-system-site-packages = true") && c.contains("/usr/bin"));
    if !sees_system {
        let _ = std::fs::remove_dir_all(venv);
    }
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    if !venv.join("bin/pip").exists() {
        run(Command::new(system).args(["-m", "venv", "--system-site-packages"]).arg(venv)).map_err(|e| {
            format!("{e}; the tests need Debian's Python 3 with venv ({system} -m venv; apt-get install python3-venv)")
        })?;
    }
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        "-r",
        "tests/python-requirements.txt",
    ]))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))
}

/// Everything a fresh clone needs to build and test: the wasm32-wasip2 target, the
/// Debian packages the tests check with, and the Python tools they run.
fn setup() -> Result<(), String> {
    wasm_target()?;
    debian_packages()?;
    libvirt_user()?;
    python_tools()
}

/// Debian builds libvirt to run QEMU as the system user `libvirt-qemu` and resolves that
/// user before it reads qemu.conf (which the tests' libvirtd sets to root); the package
/// that creates the user (libvirt-daemon-system) brings systemd units, polkit and a
/// firewall the tests need none of, so the user is made here, as that package makes it.
fn libvirt_user() -> Result<(), String> {
    let known = |db: &str| {
        Command::new("getent")
            .args([db, "libvirt-qemu"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if known("passwd") && known("group") {
        return Ok(());
    }
    if !known("group") {
        run(Command::new("groupadd").args(["--system", "libvirt-qemu"]))?;
    }
    if !known("passwd") {
        run(Command::new("useradd").args([
            "--system",
            "--gid",
            "libvirt-qemu",
            "--no-create-home",
            "--home-dir",
            "/var/lib/libvirt",
            "--shell",
            "/usr/sbin/nologin",
            "libvirt-qemu",
        ]))?;
    }
    Ok(())
}

/// Installs the wasm32-wasip2 target when the toolchain lacks it.
fn wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| {
            format!("cannot run rustup (mint needs rustup to add the {WASM_TARGET} target): {e}")
        })?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// Test totals over several `cargo test` runs.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs a `cargo test` command, echoing its output and adding up its `test result:` lines.
fn run_tests(cmd: &mut Command, totals: &mut Totals) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {}", shown(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", shown(cmd)))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading test output: {e}"))?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            totals.passed += count(" passed");
            totals.failed += count(" failed");
            totals.ignored += count(" ignored");
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", shown(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed with {status}", shown(cmd)))
    }
}

fn test() -> Result<(), String> {
    setup()?;
    let mut totals = Totals::default();
    // The host workspace in the release profile, which the benchmarks and the binary share,
    // so a cold run compiles wasmtime once.
    let host = run_tests(
        cargo().args(["test", "--release", "--workspace", "--exclude", "xtask"]),
        &mut totals,
    );
    // The project's own tasks (the deploy ISO's pieces).
    let tasks = run_tests(cargo().args(["test", "--package", "xtask"]), &mut totals);
    // The SDK and the first-party plugins, natively: their unit tests need no engine.
    let mut guests = Ok(());
    for manifest in ["sdk/Cargo.toml", "plugins/Cargo.toml"] {
        let mut c = cargo();
        c.args([
            "test",
            "--manifest-path",
            manifest,
            "--target-dir",
            "target/guest-native",
        ]);
        if manifest.starts_with("sdk") {
            c.arg("--all-features");
        }
        guests = guests.and(run_tests(&mut c, &mut totals));
    }
    // One closing line for the whole run, whatever the last crate's runner printed.
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    host.and(tasks).and(guests)
}

/// `cargo xtask soak [CYCLES]`: the crash test for CYCLES kills (1,000 by default, CI keeps
/// 100): the daemon is killed at random moments while several tiers reconcile, and every
/// invariant and every acknowledged intent is checked after each restart.
///
/// `cargo xtask soak failover [ITERATIONS]`: the failover test for ITERATIONS faults (100
/// by default, CI keeps 21): three daemons on a three-member etcd, the leader killed,
/// paused past its lease, or an etcd member killed, each in turn; its figures are written to
/// `target/failover-soak.txt`.
fn soak(args: &[String]) -> Result<(), String> {
    let failover = args.first().map(String::as_str) == Some("failover");
    let args = if failover { &args[1..] } else { args };
    let (what, default) = if failover {
        ("iterations", 100)
    } else {
        ("cycles", 1000)
    };
    let n = match args.first() {
        None => default,
        Some(c) => c
            .parse::<u32>()
            .map_err(|_| format!("soak: `{c}` is not a number of {what}"))?,
    };
    wasm_target()?;
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "--package",
        "mint",
        "--test",
        "integration",
        "--",
        if failover {
            "failover::three"
        } else {
            "crash::"
        },
        "--nocapture",
    ]);
    if failover {
        // Absolute: the test runs in its package's directory, not the repository's root.
        let report = std::env::current_dir()
            .map_err(|e| format!("soak: the current directory: {e}"))?
            .join("target/failover-soak.txt");
        c.env("MINT_FAILOVER_ITERATIONS", n.to_string())
            .env("MINT_FAILOVER_REPORT", report);
    } else {
        c.env("MINT_CRASH_CYCLES", n.to_string());
    }
    run(&mut c)
}

/// The `mint` binary's arguments for `cargo xtask daemon ARGS`: the daemon with its state in
/// `target/mint-data`, unless ARGS name another `--data-dir`.
fn daemon_args(extra: &[String]) -> Vec<String> {
    let mut args = vec!["daemon".to_string()];
    if !extra
        .iter()
        .any(|a| a == "--data-dir" || a.starts_with("--data-dir="))
    {
        args.extend(["--data-dir".to_string(), "target/mint-data".to_string()]);
    }
    args.extend(extra.iter().cloned());
    args
}

/// A configuration for the daemon of this checkout, written into its data directory once
/// (the daemon reads `<data-dir>/mint.toml` by default) unless ARGS name one: it lets
/// `mint instance materialize` write below `<data-dir>/materialized`, as the quickstart does.
/// Returns ARGS.
fn dev_config(args: &[String]) -> Result<Vec<String>, String> {
    if args
        .iter()
        .any(|a| a == "--config" || a.starts_with("--config="))
    {
        return Ok(args.to_vec());
    }
    let data = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "target/mint-data".into());
    let file = std::path::Path::new(&data).join("mint.toml");
    if !file.exists() {
        std::fs::create_dir_all(&data).map_err(|e| format!("cannot create {data}: {e}"))?;
        let text = "# Written by `cargo xtask daemon` for the daemon of this checkout; edit freely.\n\
                    [materialize]\n\
                    root = \"materialized\"   # relative to this file: instances materialize below it\n";
        std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    Ok(args.to_vec())
}

/// Builds the workspace the way the test command does and runs `target/release/mint ARGS`
/// in place of this process.
///
/// Why not `cargo run -p mint`: a build of one package resolves features without the
/// workspace's dev-dependencies, so it compiles wasmtime's crates a second time, with other
/// features, beside the ones the tests built. Building what `cargo test` builds (libraries,
/// binaries, tests) shares one set of artifacts with `cargo xtask test`, so after either
/// the other builds nothing.
/// The process is replaced rather than spawned, so signals reach the daemon itself.
fn run_mint(args: &[String]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--workspace",
        "--exclude",
        "xtask",
        "--lib",
        "--bins",
        "--tests",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target".into());
    let mint = target.join("release/mint");
    let e = Command::new(&mint).args(args).exec();
    Err(format!("cannot run {}: {e}", mint.display()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Tasks name files relative to the repository's root, wherever cargo was run from.
    if let Err(e) = std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")) {
        eprintln!("xtask: cannot enter the repository's root: {e}");
        return ExitCode::FAILURE;
    }
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("daemon") => wasm_target()
            .and_then(|_| dev_config(&daemon_args(&args[1..])))
            .and_then(|a| run_mint(&a)),
        Some("demo") => {
            wasm_target().and_then(|_| run_mint(&[&["demo".to_string()], &args[1..]].concat()))
        }
        Some("test") => test(),
        Some("bench") => wasm_target()
            .and_then(|_| {
                run(cargo().args([
                    "bench",
                    "--package",
                    "mint-plugins",
                    "--bench",
                    "plugin_cost",
                ]))
            })
            .and_then(|_| run(cargo().args(["bench", "--package", "mint-core", "--bench", "pool"])))
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint-core", "--bench", "instances"]))
            })
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint-daemon", "--bench", "api"]))
            })
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint-daemon", "--bench", "secure_api"]))
            })
            .and_then(|_| run(cargo().args(["bench", "--package", "mint", "--bench", "scale_out"])))
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint", "--bench", "boot_storm"]))
            })
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint", "--bench", "redfish_deploys"]))
            })
            .and_then(|_| {
                run(cargo().args(["bench", "--package", "mint", "--bench", "control_plane"]))
            }),
        Some("soak") => soak(&args[1..]),
        Some("deploy-iso") => match &args[1..] {
            [] => deploy_iso::build(std::path::Path::new("target/mint-deploy/deploy.iso")),
            [flag, out] if flag == "--out" => deploy_iso::build(std::path::Path::new(out)),
            _ => Err("usage: cargo xtask deploy-iso [--out FILE]".to_string()),
        },
        Some("boot-stage") => match &args[1..] {
            [] => boot_stage::build(std::path::Path::new("target/mint-deploy/boot-stage.cpio")),
            [flag, out] if flag == "--out" => boot_stage::build(std::path::Path::new(out)),
            _ => Err("usage: cargo xtask boot-stage [--out FILE]".to_string()),
        },
        _ => Err(
            "usage: cargo xtask <setup | daemon | demo | test | bench | soak [CYCLES] | deploy-iso [--out FILE] | boot-stage [--out FILE]>".to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
