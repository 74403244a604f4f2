//! Network boot: iPXE scripts by MAC, the boot stage and each master's kernel and NIC
//! drivers, the boot stage's report, and the DHCP configuration a site's dnsmasq serves
//! (static leases of bound nodes' MACs to their instances' addresses, and the iPXE chain).
//!
//! Firmware cannot do the engine's TLS, so `[netboot] listen` is a second, plain HTTP
//! listener that serves only what a booting node fetches before it runs mint's boot stage:
//! these scripts, the boot stage (the same for every node, no secret) and, under a
//! capability, the kernel and modules of the node's instance. The script's capability is
//! valid for minutes only and is handed only to the instance's own address (the lease the
//! DHCP server gives that MAC) unless `check-source = false`; the instance's parts
//! themselves are fetched by the boot stage over the engine's TLS, by its pin, or, where
//! `[netboot] ca` names a CA (an HTTP cache for blobs stands between the nodes and the
//! engine), checked against that CA, which the script hands over as one more initramfs.

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::{ApiError, Shared};

/// How long the capability in a boot script admits at least its kernel, modules and
/// descriptor (the tier's deploy timeout, if longer, wins: the boot stage reports with it
/// after fetching everything); a node that boots again later asks for a fresh script.
pub const SCRIPT_TTL_SECS: u64 = 900;

/// `[netboot]` of `mint.toml`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Where the boot listener listens (plain HTTP); none: no network boot.
    pub listen: Option<SocketAddr>,
    /// The URL nodes reach the boot listener at (default `http://LISTEN`).
    pub url: Option<String>,
    /// The boot stage (`cargo xtask boot-stage`).
    pub stage: Option<PathBuf>,
    /// Kernel parameters added to every boot (`console=ttyS0,115200`).
    pub cmdline: String,
    /// The NIC drivers the boot stage loads from the master's modules.
    pub modules: Vec<String>,
    /// The dnsmasq hosts file the engine keeps current (`dhcp-hostsfile`).
    pub hosts_file: Option<PathBuf>,
    /// dnsmasq's pid file: it is sent SIGHUP after the hosts file changes.
    pub pid_file: Option<PathBuf>,
    /// Hand a script only to the instance's own address.
    pub check_source: bool,
    /// CA certificates (PEM) the boot stage trusts instead of the engine's pin: the CA of
    /// the engine's certificate and of a blob cache's (`[artifacts] blob-base`).
    pub ca: Option<PathBuf>,
}

/// The network boot's running state.
#[derive(Default)]
pub struct Netboot {
    settings: RwLock<Settings>,
    /// The boot stage's bytes, read when the configuration is applied.
    stage: RwLock<Option<Arc<Vec<u8>>>>,
    /// The initramfs archive of `[netboot] ca`, read when the configuration is applied.
    trust: RwLock<Option<Arc<Vec<u8>>>>,
    /// Boot files by master digest, built on first request.
    files: Mutex<HashMap<String, Arc<mint_core::netboot::BootFiles>>>,
    /// The hosts file as last written.
    hosts: Mutex<String>,
    /// The boot listener's URL once it listens.
    url: RwLock<Option<String>>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Netboot {
    /// Puts `[netboot]` into effect (the listener itself is bound once, at start).
    pub fn set(&self, settings: Settings) -> Result<(), String> {
        let stage = match &settings.stage {
            Some(p) => Some(Arc::new(std::fs::read(p).map_err(|e| {
                format!(
                    "netboot.stage {}: {e}; build it with `cargo xtask boot-stage`",
                    p.display()
                )
            })?)),
            None => None,
        };
        let trust = match &settings.ca {
            Some(p) => Some(Arc::new(mint_core::netboot::trust_archive(
                &std::fs::read(p).map_err(|e| format!("netboot.ca {}: {e}", p.display()))?,
            ))),
            None => None,
        };
        *self.stage.write().unwrap_or_else(|p| p.into_inner()) = stage;
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = trust;
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
        Ok(())
    }

    /// Where the boot listener should listen, if anywhere.
    pub fn listen(&self) -> Option<SocketAddr> {
        read(&self.settings).listen
    }

    /// Records the boot listener's URL.
    pub fn set_url(&self, bound: SocketAddr) {
        let url = read(&self.settings)
            .url
            .unwrap_or_else(|| format!("http://{bound}"));
        *self.url.write().unwrap_or_else(|p| p.into_inner()) = Some(url);
    }

    fn url(&self) -> Option<String> {
        read(&self.url)
    }
}

/// A MAC in the one form the engine compares (`52:54:00:aa:00:01`), or `None`.
pub fn normal_mac(mac: &str) -> Option<String> {
    let m = mac.trim().to_ascii_lowercase().replace('-', ":");
    let ok = m.len() == 17
        && m.split(':')
            .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
    ok.then_some(m)
}

fn script(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// The script a MAC bound to no instance gets: it says so and boots nothing. The same
/// for every reason (no such node, nothing bound, another address asking), so it reveals
/// nothing.
fn not_bound(mac: &str) -> Response {
    script(format!(
        "#!ipxe\necho mint: {mac} is bound to no instance; nothing to boot\nsleep 5\nexit 1\n"
    ))
}

/// `GET /v1/boot`: the script DHCP points iPXE at; it chains to the node's own by MAC.
#[utoipa::path(get, path = "/v1/boot", tag = "netboot",
    responses((status = 200, description = "The iPXE script DHCP points at", content_type = "text/plain")), security(()))]
async fn chain(State(app): State<Shared>) -> Response {
    let base = app.netboot.url().unwrap_or_default();
    script(format!("#!ipxe\nchain {base}/v1/boot/${{netX/mac}}\n"))
}

/// `GET /v1/boot/{mac}`: the iPXE script that boots the instance bound to the node with
/// that MAC: its master's kernel, mint's boot stage and the kernel's NIC drivers, and a
/// command line carrying the deployment's descriptor as a capability URL.
#[utoipa::path(get, path = "/v1/boot/{mac}", tag = "netboot", params(("mac" = String, Path, description = "The booting NIC's MAC address")),
    responses((status = 200, description = "The node's own iPXE script", content_type = "text/plain")), security(()))]
async fn boot(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac): Path<String>,
) -> Response {
    let Some(mac) = normal_mac(&mac) else {
        return ApiError(
            StatusCode::BAD_REQUEST,
            format!("`{mac}` is not a MAC address; ask for /v1/boot/52:54:00:aa:00:01"),
        )
        .into_response();
    };
    let settings = read(&app.netboot.settings);
    let target = crate::off_async_threads(|| app.engine.netboot_target(&mac, SCRIPT_TTL_SECS));
    let Some(t) = target else {
        return not_bound(&mac);
    };
    if settings.check_source && peer.ip() != t.instance.address {
        tracing::warn!(
            %mac, peer = %peer.ip(), expected = %t.instance.address,
            "a boot script was asked for from another address than the instance's lease; answered not bound"
        );
        return not_bound(&mac);
    }
    let (Some(base), Some(_)) = (app.netboot.url(), read(&app.netboot.stage)) else {
        return script(format!(
            "#!ipxe\necho mint: {mac} is bound, but this engine has no boot stage ([netboot] stage)\nsleep 5\nexit 1\n"
        ));
    };
    let i = &t.instance;
    let cap = format!("/v1/cap/{}/{}/{}", i.id.tier, i.id.index, t.token);
    let engine = app.engine.advertise.trim_end_matches('/');
    let mut args = vec![
        format!("mint.descriptor={engine}{cap}"),
        format!("mint.mac={mac}"),
        format!("mint.addr={}/{}", i.address, t.prefix_len),
    ];
    // With a CA the boot stage checks names against it (the engine's and a blob cache's);
    // otherwise the engine's pin admits the engine's key alone.
    let trust = read(&app.netboot.trust).is_some();
    if trust {
        args.push(format!("mint.ca=/{}", mint_core::netboot::TRUST_PATH));
    } else if let Some(pin) = app.delivery.engine_pin() {
        args.push(format!("mint.pin={pin}"));
    }
    if let Some(gw) = t.gateway {
        args.push(format!("mint.gw={gw}"));
    }
    if !settings.cmdline.is_empty() {
        args.push(settings.cmdline.clone());
    }
    tracing::info!(%mac, node = %t.node, instance = %format!("{}/{}", i.id.tier, i.id.index), "boot script");
    let trust_initrd = if trust {
        format!("initrd {base}/v1/boot/trust\n")
    } else {
        String::new()
    };
    script(format!(
        "#!ipxe\necho mint: {mac} boots {}/{} ({} at {})\nkernel {base}{cap}/kernel {}\ninitrd {base}/v1/boot/stage\n{trust_initrd}initrd {base}{cap}/modules\nboot\n",
        i.id.tier,
        i.id.index,
        i.hostname,
        i.address,
        args.join(" ")
    ))
}

/// `GET /v1/boot/stage`: mint's boot stage, the same for every node.
#[utoipa::path(get, path = "/v1/boot/stage", tag = "netboot",
    responses((status = 200, description = "mint's boot stage initramfs", content_type = "application/octet-stream")), security(()))]
async fn stage(State(app): State<Shared>, method: Method) -> Response {
    match read(&app.netboot.stage) {
        Some(bytes) => bytes_answer(&method, &bytes),
        None => ApiError(
            StatusCode::NOT_FOUND,
            "this engine has no boot stage: give the daemon `[netboot] stage = \"FILE\"` (`cargo xtask boot-stage` builds one)".into(),
        )
        .into_response(),
    }
}

/// `GET /v1/boot/trust`: the CA certificates of `[netboot] ca` as an initramfs archive (public
/// certificates, no secret), for every node.
#[utoipa::path(get, path = "/v1/boot/trust", tag = "netboot",
    responses((status = 200, description = "What the boot stage trusts (certificates, no secret)", content_type = "application/octet-stream")), security(()))]
async fn trust(State(app): State<Shared>, method: Method) -> Response {
    match read(&app.netboot.trust) {
        Some(bytes) => bytes_answer(&method, &bytes),
        None => ApiError(
            StatusCode::NOT_FOUND,
            "this engine hands out no CA: boot stages trust its pin (`[netboot] ca = \"FILE\"` sets one)".into(),
        )
        .into_response(),
    }
}

fn bytes_answer(method: &Method, bytes: &[u8]) -> Response {
    let body = if *method == Method::HEAD {
        Vec::new()
    } else {
        bytes.to_vec()
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, bytes.len().to_string()),
        ],
        body,
    )
        .into_response()
}

/// The boot files of `master`, built once per master.
fn boot_files(
    app: &Shared,
    t: &mint_model::records::Instance,
) -> Result<Arc<mint_core::netboot::BootFiles>, ApiError> {
    let tier = app
        .engine
        .store
        .tier(&t.id.tier)
        .map_err(mint_core::EngineError::from)?;
    if let Some(f) = app
        .netboot
        .files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&tier.image)
    {
        return Ok(f.clone());
    }
    let mut modules = read(&app.netboot.settings).modules;
    if modules.is_empty() {
        modules = mint_core::netboot::DEFAULT_MODULES
            .iter()
            .map(|m| m.to_string())
            .collect();
    }
    let built = Arc::new(mint_core::netboot::boot_files(
        &app.engine.images.tar(&tier.image),
        &modules,
    )?);
    tracing::info!(master = %tier.image, release = %built.release, modules = built.module_count, "boot files");
    app.netboot
        .files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tier.image.clone(), built.clone());
    Ok(built)
}

/// `GET /v1/cap/{tier}/{index}/{token}/kernel` and `.../modules`: the kernel of the
/// instance's master and the archive of its NIC drivers, under the deployment's capability.
pub async fn cap_boot_file(
    State(app): State<Shared>,
    method: Method,
    Path((tier, index, token, role)): Path<(String, u32, String, String)>,
) -> Response {
    let Some(inst) = app.engine.capability_instance(&tier, index, &token) else {
        return crate::artifacts::no_capability().into_response();
    };
    if !matches!(role.as_str(), "kernel" | "modules") || inst.disk.is_some() {
        return crate::artifacts::no_capability().into_response();
    }
    let files = {
        let _files = app.image_files.read().await;
        crate::off_async_threads(|| boot_files(&app, &inst))
    };
    match files {
        Ok(f) if role == "kernel" => bytes_answer(&method, &f.kernel),
        Ok(f) => bytes_answer(&method, &f.modules),
        Err(e) => e.into_response(),
    }
}

/// The routes a booting node reaches without TLS (the boot listener's whole API).
pub fn boot_routes() -> Router<Shared> {
    Router::new()
        .route("/v1/boot", get(chain))
        .route("/v1/boot/stage", get(stage).head(stage))
        .route("/v1/boot/trust", get(trust).head(trust))
        .route("/v1/boot/{mac}", get(boot))
}

/// The boot listener's router: the boot routes and the kernel and modules under a
/// capability; nothing else of the engine's.
pub fn router(app: Shared) -> Router {
    boot_routes()
        .route(
            "/v1/cap/{tier}/{index}/{token}/{role}",
            get(cap_boot_file).head(cap_boot_file),
        )
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "the boot listener serves /v1/boot only; the API is on the daemon's own address"
                    .into(),
            )
        })
        .with_state(app)
}

/// The bound nodes' leases: each node's MACs, its instance's address and host name.
fn bound(app: &Shared) -> Vec<(Vec<String>, String, String)> {
    let Ok(nodes) = app.engine.store.nodes() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Each tier's instances are read once, however many of its nodes boot.
    let mut tiers: HashMap<String, HashMap<u32, mint_model::records::Instance>> = HashMap::new();
    for n in nodes {
        let (Some(macs), Some(id)) = (n.properties.get("mac"), &n.instance) else {
            continue;
        };
        let by_index = tiers.entry(id.tier.clone()).or_insert_with(|| {
            app.engine
                .store
                .instances(&id.tier)
                .unwrap_or_default()
                .into_iter()
                .map(|i| (i.id.index, i))
                .collect()
        });
        let Some(i) = by_index.get(&id.index) else {
            continue;
        };
        let macs: Vec<String> = macs.split(',').filter_map(normal_mac).collect();
        if !macs.is_empty() {
            out.push((macs, i.address.to_string(), i.hostname.clone()));
        }
    }
    out
}

/// How many earlier MACs a lease line keeps for its address.
const EARLIER_MACS: usize = 4;

/// The `dhcp-hostsfile` text of `bound` leases. A line also names the MACs that held its
/// address in `previous` (the file as last written) and are bound to nothing now: dnsmasq
/// keeps a lease until it expires, and gives a configured address to another MAC only when
/// the line names the lease's MAC too ("permission to abandon a lease"), so a replacement
/// node gets its instance's address at once.
pub fn render_hosts(bound: &[(Vec<String>, String, String)], previous: &str) -> String {
    let now: std::collections::HashSet<&str> = bound
        .iter()
        .flat_map(|(m, _, _)| m.iter().map(String::as_str))
        .collect();
    let mut earlier: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in previous.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() < 3 {
            continue;
        }
        let ip = fields[fields.len() - 2];
        earlier.entry(ip).or_default().extend(
            fields[..fields.len() - 2]
                .iter()
                .filter(|m| normal_mac(m).is_some()),
        );
    }
    let mut lines: Vec<String> = bound
        .iter()
        .map(|(macs, ip, name)| {
            let mut all: Vec<&str> = macs.iter().map(String::as_str).collect();
            for m in earlier.get(ip.as_str()).into_iter().flatten() {
                if !now.contains(m) && !all.contains(m) && all.len() < macs.len() + EARLIER_MACS {
                    all.push(m);
                }
            }
            format!("{},{ip},{name}", all.join(","))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|l| l + "\n").collect()
}

/// The static leases as they are now, for a configuration printed once.
pub fn hosts(app: &Shared) -> String {
    render_hosts(&bound(app), "")
}

/// Writes the hosts file when the leases changed (atomically: a new file renamed over the
/// old) and tells dnsmasq to read it again.
pub fn keep_hosts_current(app: &Shared) {
    let settings = read(&app.netboot.settings);
    let Some(path) = settings.hosts_file else {
        return;
    };
    let mut last = app.netboot.hosts.lock().unwrap_or_else(|p| p.into_inner());
    // After a restart the file as last written is the history of its addresses.
    if last.is_empty() {
        *last = std::fs::read_to_string(&path).unwrap_or_default();
    }
    let text = render_hosts(&bound(app), &last);
    if *last == text && path.exists() {
        return;
    }
    let staged = path.with_extension("mint-new");
    if let Err(e) = std::fs::write(&staged, &text).and_then(|_| std::fs::rename(&staged, &path)) {
        tracing::error!("netboot.dnsmasq-hosts {}: {e}", path.display());
        return;
    }
    *last = text;
    if let Some(pid) = settings
        .pid_file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        // SAFETY: kill with a pid read from dnsmasq's own pid file and SIGHUP, which dnsmasq
        // handles by rereading its hosts files.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    }
}

/// `GET /v1/netboot/dnsmasq`: a dnsmasq configuration that serves the engine's network
/// boot: DHCP only, a static range per tier subnet with its router, iPXE chained to the
/// boot listener, and the leases (as the hosts file the engine keeps, or inline).
#[utoipa::path(get, path = "/v1/netboot/dnsmasq", tag = "netboot",
    responses((status = 200, description = "A dnsmasq configuration for the boot network", content_type = "text/plain")), security(("bearer" = [])))]
pub async fn dnsmasq(State(app): State<Shared>) -> Result<Response, ApiError> {
    let settings = read(&app.netboot.settings);
    let Some(base) = app.netboot.url() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "network boot is off: give the daemon `[netboot] listen = \"ADDRESS:PORT\"` on the boot network".into(),
        ));
    };
    let tiers = app
        .engine
        .store
        .tiers()
        .map_err(mint_core::EngineError::from)?;
    let mut out = String::from(
        "# dnsmasq configuration for mint's network boot (`mint netboot dnsmasq-config`).\n\
         # DHCP only: no DNS. Add `interface=` for the boot network.\n\
         port=0\n\
         bind-dynamic\n\
         log-dhcp\n",
    );
    for t in &tiers {
        let net = &t.plan.subnet;
        if let std::net::IpAddr::V4(a) = net.network() {
            let p = net.prefix_len();
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            out.push_str(&format!(
                "dhcp-range=set:{tag},{a},static,{},12h\n",
                std::net::Ipv4Addr::from(mask),
                tag = t.name
            ));
            if let Some(gw) = t.plan.gateway {
                out.push_str(&format!("dhcp-option=tag:{},option:router,{gw}\n", t.name));
            }
        }
    }
    out.push_str(&format!(
        "# iPXE (option 175) chains to the engine; other PXE firmware loads iPXE first over\n\
         # TFTP: enable-tftp, tftp-root=/usr/lib/ipxe, dhcp-boot=tag:!ipxe,undionly.kpxe\n\
         dhcp-match=set:ipxe,175\n\
         dhcp-boot=tag:ipxe,{base}/v1/boot\n"
    ));
    match settings.hosts_file {
        Some(p) => out.push_str(&format!(
            "# The engine rewrites this file as bindings change{}.\ndhcp-hostsfile={}\n",
            if settings.pid_file.is_some() {
                " and sends dnsmasq SIGHUP"
            } else {
                " (send dnsmasq SIGHUP, or give the daemon [netboot] dnsmasq-pid-file)"
            },
            p.display()
        )),
        None => {
            out.push_str("# Leases as they are now; give the daemon [netboot] dnsmasq-hosts to keep them current.\n");
            for l in crate::off_async_threads(|| hosts(&app)).lines() {
                out.push_str(&format!("dhcp-host={l}\n"));
            }
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_address_names_the_mac_that_held_it_so_dnsmasq_may_abandon_that_lease() {
        let b = |mac: &str, ip: &str, name: &str| {
            (vec![mac.to_string()], ip.to_string(), name.to_string())
        };
        let first = render_hosts(&[b("52:54:00:00:00:01", "198.18.9.1", "net-0")], "");
        assert_eq!(first, "52:54:00:00:00:01,198.18.9.1,net-0\n");
        // net-0 moves to ...:03; ...:01 is bound to nothing now.
        let moved = render_hosts(&[b("52:54:00:00:00:03", "198.18.9.1", "net-0")], &first);
        assert_eq!(
            moved,
            "52:54:00:00:00:03,52:54:00:00:00:01,198.18.9.1,net-0\n"
        );
        // ...:01 is bound again, elsewhere: it leaves net-0's line for its own.
        let again = render_hosts(
            &[
                b("52:54:00:00:00:03", "198.18.9.1", "net-0"),
                b("52:54:00:00:00:01", "198.18.9.2", "net-1"),
            ],
            &moved,
        );
        assert_eq!(
            again,
            "52:54:00:00:00:01,198.18.9.2,net-1\n52:54:00:00:00:03,198.18.9.1,net-0\n"
        );
        assert_eq!(
            normal_mac("52-54-00-AA-00-01").as_deref(),
            Some("52:54:00:aa:00:01")
        );
        assert_eq!(normal_mac("52:54:00:aa:00"), None);
    }
}
