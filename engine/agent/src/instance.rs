//! The one instance a node runs: fetching its artifact from the engine's artifact server
//! (the master through the node's cache, the instance's own layer each time), checking
//! every digest, assembling the instance's root without copying the master (an overlay
//! mount, else links or clones of the cached master's files), bringing up its address,
//! starting its service, and undoing all of it.
//!
//! A deploy request is answered at once (`deploying`) and carried out by a worker thread;
//! the driver polls `status`. Asking again for the same instance and version answers its
//! state and deploys nothing twice.

use crate::Agent;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// What the `agent` driver sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeployRequest {
    pub tier: String,
    pub index: u32,
    pub hostname: String,
    /// The artifact descriptor's URL on the engine.
    pub artifact_url: String,
    /// The version of the instance's customization: a new one is a new deployment.
    pub version: String,
}

/// Where the instance is on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    #[default]
    Absent,
    Deploying,
    Running,
    Failed,
}

/// The node's one instance slot.
#[derive(Default)]
pub struct Slot {
    request: Option<DeployRequest>,
    state: State,
    detail: String,
    address: Option<(String, u8)>,
    service: Option<Child>,
    /// A process the agent watches by pid rather than as its child: a service started by
    /// an earlier run of the agent, found alive at start, or the instance's VM (QEMU runs
    /// daemonized, so that it outlives the agent).
    adopted: Option<i32>,
    /// The deployment directory of the instance's VM, in VM mode.
    vm: Option<PathBuf>,
    /// Bumped by every deploy and stop, so a worker that was overtaken drops its result.
    generation: u64,
    /// The cached master the instance's root is built on, held while it runs.
    lease: Option<crate::cache::Lease>,
}

/// What the agent keeps on disk about its instance, so that a restarted agent knows what
/// runs on its node (and can be told to stop it).
#[derive(Serialize, Deserialize)]
struct Saved {
    request: DeployRequest,
    address: (String, u8),
    pid: Option<u32>,
    generation: u64,
    /// The master's digest, held in the cache again after a restart.
    #[serde(default)]
    master: Option<String>,
    /// The deployment directory when `pid` is the instance's VM.
    #[serde(default)]
    vm: Option<PathBuf>,
}

fn saved_path(agent: &Agent) -> PathBuf {
    agent.args.root.join("instance.json")
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Takes up what an earlier run of the agent left: the instance it ran, running still if
/// its service is alive, failed otherwise.
pub fn restore(agent: &Agent) {
    let Ok(text) = std::fs::read_to_string(saved_path(agent)) else {
        return;
    };
    let Ok(saved) = serde_json::from_str::<Saved>(&text) else {
        return;
    };
    let mut slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
    let pid = match &saved.vm {
        // A VM is found again only by a pid whose command line is that deployment's QEMU.
        Some(dir) => saved
            .pid
            .filter(|p| crate::vm::is_ours(*p, dir))
            .map(|p| p as i32),
        None => saved.pid.map(|p| p as i32).filter(|p| alive(*p)),
    };
    slot.state = if pid.is_some() || saved.pid.is_none() {
        State::Running
    } else {
        State::Failed
    };
    let what = if saved.vm.is_some() { "VM" } else { "service" };
    slot.detail = format!(
        "taken up after an agent restart ({what} {})",
        if pid.is_some() { "alive" } else { "gone" }
    );
    slot.vm = saved.vm;
    slot.request = Some(saved.request);
    slot.address = Some(saved.address);
    slot.adopted = pid;
    slot.generation = saved.generation;
    slot.lease = saved
        .master
        .as_deref()
        .and_then(|d| agent.cache.hold_cached(d));
}

/// The instance this node runs, for heartbeats.
pub fn current(agent: &Agent) -> Option<(String, u32)> {
    let slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
    if slot.state == State::Absent {
        return None;
    }
    slot.request.as_ref().map(|r| (r.tier.clone(), r.index))
}

/// The answer to `status` and `deploy`.
#[derive(Debug, Serialize)]
pub struct Status {
    state: State,
    tier: Option<String>,
    index: Option<u32>,
    version: Option<String>,
    detail: String,
    /// The VM's run state as QEMU reports it (`running`, `paused`, `shutdown`, ...), in VM
    /// mode.
    #[serde(skip_serializing_if = "Option::is_none", rename = "vm-state")]
    vm_state: Option<String>,
}

pub fn status(agent: &Agent) -> Status {
    let mut slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
    // A service that died makes the instance failed.
    if slot.state == State::Running
        && let Some(child) = slot.service.as_mut()
        && let Ok(Some(exit)) = child.try_wait()
    {
        slot.state = State::Failed;
        slot.detail = format!("the instance's service exited: {exit}");
    }
    if slot.state == State::Running
        && let Some(pid) = slot.adopted
        && !alive(pid)
    {
        slot.state = State::Failed;
        slot.detail = if slot.vm.is_some() {
            "the instance's VM exited".into()
        } else {
            "the instance's service exited".into()
        };
    }
    // A VM whose guest powered off or panicked is no longer the instance running, though
    // QEMU still lives; the engine's health check then places the instance again.
    let mut vm_state = None;
    if let Some(dir) = slot.vm.clone()
        && slot.state == State::Running
    {
        vm_state = crate::vm::run_state(&dir);
        if let Some(s) = vm_state.as_deref()
            && ["shutdown", "guest-panicked", "internal-error", "io-error"].contains(&s)
        {
            slot.state = State::Failed;
            slot.detail = format!("the instance's VM is {s}");
        }
    }
    Status {
        state: slot.state,
        tier: slot.request.as_ref().map(|r| r.tier.clone()),
        index: slot.request.as_ref().map(|r| r.index),
        version: slot.request.as_ref().map(|r| r.version.clone()),
        // Heartbeats carry the detail, so the engine sees the VM's state too.
        detail: match vm_state.as_deref() {
            Some(s) if slot.state == State::Running => format!("{}; VM {s}", slot.detail),
            _ => slot.detail.clone(),
        },
        vm_state,
    }
}

/// Starts deploying `req`, or answers the state of the same deployment already here.
pub fn start(agent: &std::sync::Arc<Agent>, req: DeployRequest) -> Result<Status, String> {
    {
        let mut slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
        match &slot.request {
            Some(r) if *r == req && slot.state != State::Failed => {}
            Some(r) if slot.state != State::Absent => {
                return Err(format!(
                    "this node holds {}/{} ({:?}); undeploy it first",
                    r.tier, r.index, slot.state
                ));
            }
            _ => {
                slot.generation += 1;
                slot.request = Some(req.clone());
                slot.state = State::Deploying;
                slot.detail = "fetching the artifact".into();
                let (agent, generation) = (agent.clone(), slot.generation);
                std::thread::spawn(move || {
                    let outcome = deploy(&agent, &req, generation);
                    let mut slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.generation != generation {
                        // Undeployed (or replaced) while this worker ran: undo what it did.
                        drop(slot);
                        if let Ok(d) = outcome {
                            undo(&agent, &req, generation, Some(d.address), d.service, d.vm);
                        }
                        return;
                    }
                    match outcome {
                        Ok(Deployed {
                            address,
                            service,
                            lease,
                            how,
                            vm,
                        }) => {
                            slot.state = State::Running;
                            slot.detail =
                                format!("{} at {}/{} ({how})", req.hostname, address.0, address.1);
                            let master = lease.as_ref().map(|_| how.master.clone());
                            let pid = service.as_ref().map(Child::id).or(vm.as_ref().map(|v| v.0));
                            let vm_dir = vm.map(|v| v.1);
                            let saved = Saved {
                                request: req.clone(),
                                address: address.clone(),
                                pid,
                                generation,
                                master,
                                vm: vm_dir.clone(),
                            };
                            if let Ok(text) = serde_json::to_string(&saved) {
                                let _ = std::fs::write(saved_path(&agent), text);
                            }
                            slot.address = Some(address);
                            slot.service = service;
                            slot.lease = lease;
                            slot.adopted = vm_dir.as_ref().and(pid.map(|p| p as i32));
                            slot.vm = vm_dir;
                        }
                        Err(e) => {
                            slot.state = State::Failed;
                            slot.detail = e;
                        }
                    }
                });
            }
        }
    }
    Ok(status(agent))
}

#[derive(Deserialize)]
struct Descriptor {
    format: String,
    hostname: String,
    address: String,
    prefix_len: u8,
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    role: String,
    url: String,
    digest: String,
    #[serde(default)]
    name: String,
}

/// What a finished deployment holds.
struct Deployed {
    address: (String, u8),
    service: Option<Child>,
    lease: Option<crate::cache::Lease>,
    how: How,
    /// The instance's VM, in VM mode: QEMU's pid and the deployment's directory.
    vm: Option<(u32, PathBuf)>,
}

/// How a deployment got its root, for its status detail.
struct How {
    master: String,
    master_fetched: u64,
    layer_fetched: u64,
    method: &'static str,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.master_fetched == 0 {
            write!(
                f,
                "master cached; {} bytes fetched; root by {}",
                self.layer_fetched, self.method
            )
        } else {
            write!(
                f,
                "master fetched; {} bytes fetched; root by {}",
                self.master_fetched + self.layer_fetched,
                self.method
            )
        }
    }
}

/// Each deployment gets its own directory, so one being undone never touches the files
/// of a newer deployment of the same instance.
fn instance_dir(agent: &Agent, tier: &str, index: u32, generation: u64) -> PathBuf {
    agent.args.root.join(format!("{tier}-{index}.{generation}"))
}

/// Resolves a URL the descriptor gives (absolute, or a path on the engine).
fn absolute(base: &str, url: &str) -> String {
    if url.contains("://") {
        return url.into();
    }
    let origin = match base.find("://").map(|i| i + 3) {
        Some(start) => match base[start..].find('/') {
            Some(end) => &base[..start + end],
            None => base,
        },
        None => base,
    };
    format!("{origin}{url}")
}

/// Runs `ip ARGS` (iproute2); the error says what it printed.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// GETs `url`, retrying while the server cannot be reached or answers 5xx.
fn fetch(agent: &Agent, http: &ureq::Agent, url: &str) -> Result<ureq::Response, ureq::Error> {
    let deadline = std::time::Instant::now() + crate::cache::FETCH_PATIENCE;
    loop {
        let result = agent
            .authorized(http.get(url))
            .timeout(Duration::from_secs(60))
            .call();
        let retry = match &result {
            Ok(_) => false,
            Err(ureq::Error::Transport(_)) => true,
            Err(ureq::Error::Status(code, _)) => *code >= 500,
        };
        if !retry || std::time::Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

fn c_path(p: &Path) -> Result<std::ffi::CString, String> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", p.display()))
}

/// Mounts an overlay of `lower` (the cached master, never written) and `upper` at `root`.
fn mount_overlay(lower: &Path, upper: &Path, work: &Path, root: &Path) -> Result<(), String> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if [lower, upper, work]
        .iter()
        .any(|p| p.to_string_lossy().contains([',', ':']))
    {
        return Err(
            "a cache or root path holds `,` or `:`, which overlay options cannot carry".into(),
        );
    }
    let (src, target, fstype, data) = (
        c"overlay",
        c_path(root)?,
        c"overlay",
        std::ffi::CString::new(options).map_err(|e| e.to_string())?,
    );
    // SAFETY: every pointer is a NUL-terminated string that lives for the call.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    } != 0
    {
        return Err(format!(
            "overlay mount: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Builds the instance's root in `dir/root` from the cached master tree and the instance's
/// layer: an overlay mount (upper = the layer, with overlayfs whiteouts), or where the node
/// cannot mount one (or --no-overlay), the master's files shared by clone or hard link and
/// the layer applied over them. Returns the root and how it was built.
fn assemble(
    agent: &Agent,
    lower: &Path,
    layer: &Path,
    dir: &Path,
) -> Result<(PathBuf, &'static str), String> {
    let root = dir.join("root");
    let open = || {
        std::fs::File::open(layer)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("cannot read the layer: {e}"))
    };
    if !agent.args.no_overlay {
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        let tried = (|| {
            for d in [&upper, &work, &root] {
                std::fs::create_dir_all(d)
                    .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            }
            mint_layers::unpack(open()?, &upper, mint_layers::Whiteouts::Overlay)
                .map_err(|e| format!("the layer: {e}"))?;
            mount_overlay(lower, &upper, &work, &root)
        })();
        match tried {
            Ok(()) => return Ok((root, "overlay")),
            Err(e) => {
                tracing::warn!("{e}; sharing the master's files instead");
                for d in [&upper, &work, &root] {
                    let _ = mint_layers::remove_any(d);
                }
            }
        }
    }
    let shared = mint_layers::share::share_tree(lower, &root)
        .map_err(|e| format!("building the root from the master: {e}"))?;
    mint_layers::unpack(open()?, &root, mint_layers::Whiteouts::Apply)
        .map_err(|e| format!("applying the layer: {e}"))?;
    Ok((root, shared.method.as_str()))
}

/// Stages a disk instance: the master once per node (cached, shared read-only by every
/// instance that backs onto it), and the instance's own copy of the overlay (which the VM
/// writes) and of its seed, in the deployment's directory, with the master linked in under
/// the name the overlay's backing file gives. The instance's address is its VM's, so the
/// node's own interface gets none.
fn stage_disk(
    agent: &Agent,
    req: &DeployRequest,
    desc: &Descriptor,
    generation: u64,
) -> Result<Deployed, String> {
    let part = |role: &str| {
        desc.parts
            .iter()
            .find(|p| p.role == role)
            .ok_or_else(|| format!("the disk artifact has no `{role}` part"))
    };
    let (master, overlay, seed) = (part("master")?, part("overlay")?, part("seed")?);
    let dir = instance_dir(agent, &req.tier, req.index, generation);
    let _ = mint_layers::remove_any(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let http = agent.http.clone();
    let get = |url: &str, from: u64| {
        // No deadline for the whole body: a large master on a slow or shared link takes
        // what it takes; the client's read timeout catches a stalled transfer.
        let r = agent.authorized(http.get(url));
        if from > 0 {
            r.set("Range", &format!("bytes={from}-")).call()
        } else {
            r.call()
        }
    };
    let lease = agent.cache.file(
        &master.digest,
        &absolute(&req.artifact_url, &master.url),
        &get,
    )?;
    let safe = |name: &str| !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if ![master, overlay, seed].iter().all(|p| safe(&p.name)) {
        return Err("the disk artifact names a part with a path; each part's name must be a plain file name".into());
    }
    std::os::unix::fs::symlink(&lease.path, dir.join(&master.name))
        .map_err(|e| format!("cannot link the master: {e}"))?;
    let mut fetched = 0;
    for p in [overlay, seed] {
        let (_, n) = crate::cache::download(
            &dir.join(&p.name),
            p.digest.trim_start_matches("sha256:"),
            &absolute(&req.artifact_url, &p.url),
            &get,
        )?;
        fetched += n;
    }
    let vm = if agent.args.vm.vm {
        let pid = crate::vm::boot(
            &agent.args.vm,
            &dir,
            &dir.join(&overlay.name),
            &dir.join(&seed.name),
            &req.tier,
            req.index,
        )?;
        Some((pid, dir.clone()))
    } else {
        None
    };
    let method = if vm.is_some() {
        "booted in a VM"
    } else {
        "disk files staged for a VM"
    };
    let how = How {
        master: master.digest.clone(),
        master_fetched: lease.fetched,
        layer_fetched: fetched,
        method,
    };
    Ok(Deployed {
        address: (desc.address.clone(), desc.prefix_len),
        service: None,
        lease: Some(lease),
        how,
        vm,
    })
}

/// Fetches, checks, assembles, configures and starts.
fn deploy(agent: &Agent, req: &DeployRequest, generation: u64) -> Result<Deployed, String> {
    let http = agent.http.clone();
    let desc: Descriptor = fetch(agent, &http, &req.artifact_url)
        .map_err(|e| format!("fetching the artifact descriptor {}: {e}", req.artifact_url))?
        .into_json()
        .map_err(|e| format!("the artifact descriptor is not what the agent reads: {e}"))?;
    if desc.format != "tree" && desc.format != "disk" {
        return Err(format!(
            "artifact format `{}`: this agent runs tree and disk instances",
            desc.format
        ));
    }
    if desc.hostname != req.hostname {
        return Err(format!(
            "the artifact is for `{}`, not `{}`",
            desc.hostname, req.hostname
        ));
    }
    if desc.format == "disk" {
        return stage_disk(agent, req, &desc, generation);
    }
    let address: std::net::IpAddr = desc.address.parse().map_err(|_| {
        format!(
            "the artifact's address `{}` is not an IP address",
            desc.address
        )
    })?;
    let part = |role: &str| {
        desc.parts.iter().find(|p| p.role == role).ok_or_else(|| {
            format!("the artifact has no `{role}` part (an engine older than this agent?)")
        })
    };
    let (master, layer) = (part("master")?, part("layer")?);
    let dir = instance_dir(agent, &req.tier, req.index, generation);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    let get = |url: &str, from: u64| {
        // No deadline for the whole body: a large master on a slow or shared link takes
        // what it takes; the client's read timeout catches a stalled transfer.
        let r = agent.authorized(http.get(url));
        if from > 0 {
            r.set("Range", &format!("bytes={from}-")).call()
        } else {
            r.call()
        }
    };
    let (lease, warnings) = agent.cache.tree(
        &master.digest,
        &absolute(&req.artifact_url, &master.url),
        &get,
    )?;
    for w in warnings {
        tracing::warn!("master {}: {w}", master.digest);
    }
    let layer_hex = layer.digest.trim_start_matches("sha256:");
    let layer_path = dir.join("layer.tar");
    let (_, layer_fetched) = crate::cache::download(
        &layer_path,
        layer_hex,
        &absolute(&req.artifact_url, &layer.url),
        &get,
    )?;
    let (root, method) = assemble(agent, &lease.path, &layer_path, &dir)?;
    let how = How {
        master: master.digest.clone(),
        master_fetched: lease.fetched,
        layer_fetched,
        method,
    };

    ip(&[
        "addr",
        "replace",
        &format!("{address}/{}", desc.prefix_len),
        "dev",
        &agent.args.interface,
    ])?;
    // The address may have lived on another node until a moment ago (a failed node's
    // instance, redeployed): tell the segment where it is now.
    if let std::net::IpAddr::V4(v4) = address
        && let Err(e) = gratuitous_arp(&agent.args.interface, v4)
    {
        tracing::warn!("gratuitous ARP for {v4} on {}: {e}", agent.args.interface);
    }
    if agent.args.set_hostname {
        // SAFETY: the pointer and length describe a live byte slice.
        let rc = unsafe { libc::sethostname(req.hostname.as_ptr().cast(), req.hostname.len()) };
        if rc != 0 {
            return Err(format!(
                "cannot set the host name: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let service = start_service(agent, &root, req, &desc.address, generation)?;
    Ok(Deployed {
        address: (desc.address.clone(), desc.prefix_len),
        service,
        lease: Some(lease),
        how,
        vm: None,
    })
}

/// Starts the command in the root's `/etc/mint/service`, if there is one: a program path
/// inside the root and its arguments, with the identity in the environment, confined
/// under the OCI runtime with the root as `/` and the instance's host name.
fn start_service(
    agent: &Agent,
    root: &Path,
    req: &DeployRequest,
    address: &str,
    generation: u64,
) -> Result<Option<Child>, String> {
    let Ok(line) = std::fs::read_to_string(root.join("etc/mint/service")) else {
        return Ok(None);
    };
    let args: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let Some(program) = args.first() else {
        return Ok(None);
    };
    if !program.starts_with('/') {
        return Err(format!(
            "the service `{program}` in /etc/mint/service is not an absolute path inside the instance's root"
        ));
    }
    let env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "MINT_ROOT=/".into(),
        format!("MINT_ADDRESS={address}"),
        format!("MINT_HOSTNAME={}", req.hostname),
        format!("MINT_TIER={}", req.tier),
        format!("MINT_INDEX={}", req.index),
    ];
    let dir = instance_dir(agent, &req.tier, req.index, generation);
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle)
        .map_err(|e| format!("cannot create {}: {e}", bundle.display()))?;
    let config = crate::confine::config(root, &args, &env, &req.hostname);
    std::fs::write(bundle.join("config.json"), config.to_string())
        .map_err(|e| format!("cannot write {}/config.json: {e}", bundle.display()))?;
    let id = crate::confine::container_id(&req.tier, req.index, generation);
    let state = crate::confine::state_dir(&agent.args.root);
    // A container left by an agent that died is this deployment's no longer.
    crate::confine::delete(&agent.args.oci_runtime, &state, &id);
    let mut child = crate::confine::start(&agent.args.oci_runtime, &state, &bundle, &id)?;
    // A service that cannot start usually says so at once.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(exit)) = child.try_wait() {
        return Err(format!("the service {program} exited at once: {exit}"));
    }
    Ok(Some(child))
}

/// Stops a service this agent started (or the instance's VM), releases its address and
/// removes its root.
fn undo(
    agent: &Agent,
    req: &DeployRequest,
    generation: u64,
    address: Option<(String, u8)>,
    service: Option<Child>,
    vm: Option<(u32, PathBuf)>,
) {
    if let Some((pid, dir)) = vm {
        crate::vm::stop(pid, &dir);
    }
    // The confined service (which an agent restarted since knows by its container only).
    crate::confine::delete(
        &agent.args.oci_runtime,
        &crate::confine::state_dir(&agent.args.root),
        &crate::confine::container_id(&req.tier, req.index, generation),
    );
    if let Some(mut child) = service {
        // SAFETY: kill with a pid this process spawned and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // The address stays when a newer deployment of the same instance holds it now.
    let reused = {
        let slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.generation != generation
            && slot.state != State::Absent
            && slot
                .request
                .as_ref()
                .is_some_and(|r| r.tier == req.tier && r.index == req.index)
    };
    if let Some((addr, prefix)) = address
        && !reused
    {
        let _ = ip(&[
            "addr",
            "del",
            &format!("{addr}/{prefix}"),
            "dev",
            &agent.args.interface,
        ]);
    }
    let dir = instance_dir(agent, &req.tier, req.index, generation);
    let root = dir.join("root");
    if mounted(&root)
        && let Ok(c) = c_path(&root)
    {
        // SAFETY: a NUL-terminated path that lives for the call. Detached, so a process
        // still holding a file open under it does not keep the deployment's files.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = mint_layers::remove_any(&dir);
}

/// Stops the service, releases the address and removes the instance's root. A deployment
/// still in progress is undone by its worker when it finishes.
pub fn stop(agent: &Agent) -> Result<(), String> {
    let (request, address, service, adopted, vm, generation) = {
        let mut slot = agent.slot.lock().unwrap_or_else(|p| p.into_inner());
        let generation = slot.generation;
        slot.generation += 1;
        slot.state = State::Absent;
        slot.detail.clear();
        slot.lease = None;
        (
            slot.request.take(),
            slot.address.take(),
            slot.service.take(),
            slot.adopted.take(),
            slot.vm.take(),
            generation,
        )
    };
    let _ = std::fs::remove_file(saved_path(agent));
    let vm = match (adopted, vm) {
        (Some(pid), Some(dir)) => Some((pid as u32, dir)),
        _ => None,
    };
    if let Some(pid) = adopted.filter(|_| vm.is_none()) {
        // SAFETY: signals to the pid the agent recorded for its own service.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline && alive(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Some(r) = request {
        undo(agent, &r, generation, address, service, vm);
    }
    Ok(())
}

/// `mint-agent hello`: answers every HTTP request on `$MINT_ADDRESS:port` with the
/// instance's host name (from its root's /etc/hostname) and address.
pub fn hello(port: u16) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let address = std::env::var("MINT_ADDRESS").context("MINT_ADDRESS is not set")?;
    let root = PathBuf::from(std::env::var("MINT_ROOT").unwrap_or_else(|_| "/".into()));
    let hostname = std::fs::read_to_string(root.join("etc/hostname"))
        .context("reading the instance's /etc/hostname")?;
    let body = format!("{} {address}\n", hostname.trim());
    let ip: std::net::IpAddr = address
        .parse()
        .context("MINT_ADDRESS is not an IP address")?;
    let listener = std::net::TcpListener::bind((ip, port))
        .with_context(|| format!("listening on {address}:{port}"))?;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf);
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes());
    }
    Ok(())
}

/// Announces `addr` on `interface` with gratuitous ARP requests (sender and target both the
/// address, to the broadcast address), so neighbours that cached the address's old place
/// move it here at once, as keepalived and cloud agents do when an address moves.
fn gratuitous_arp(interface: &str, addr: std::net::Ipv4Addr) -> std::io::Result<()> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    let mac: Vec<u8> = mac_text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    if mac.len() != 6 {
        return Err(std::io::Error::other(format!(
            "interface {interface} has no Ethernet address"
        )));
    }
    let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))?
        .trim()
        .parse()
        .map_err(std::io::Error::other)?;
    let ip = addr.octets();
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet, IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip);
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: a raw packet socket; every pointer below refers to a live local value of the
    // size given, and the descriptor is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut result = Ok(());
        for _ in 0..3 {
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if sent < 0 {
                result = Err(std::io::Error::last_os_error());
                break;
            }
        }
        libc::close(fd);
        result
    }
}
