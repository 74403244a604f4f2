//! The `redfish` driver: boots an instance of an ISO master on a node through the node's
//! BMC, over the DMTF Redfish API at the node's `bmc-url` property (the system's own
//! resource, such as `https://10.1.0.17/redfish/v1/Systems/1`).
//!
//! BMCs boot ISO images from virtual CDs, and nothing else: a disk master is never put on
//! a virtual CD (on a real server nothing would start). A raw disk master goes through
//! mint's deploy ISO instead, as Ironic's virtual-media deploy does: `deploy` puts the
//! deploy ISO on the CD and the deployment's configuration on the seed device and boots
//! the CD; the deploy system writes the master to the server's own disk, tells the engine
//! and powers off; `status`, reading that report in the deployment's descriptor, ejects the
//! deploy media, inserts the seed, sets the boot device to the disk and powers the server
//! on. Without a deploy ISO served by the engine, a disk master is refused naming the fix.
//!
//! `deploy` inserts the instance's ISO master as virtual media on a CD/DVD device and the
//! instance's NoCloud seed (its identity: host name, address, keys) on a USB stick or floppy
//! device (a floppy only when the seed fits one: 1.44 MB, else refused naming the limit),
//! sets a one-time boot override to that CD, powers the system on (or restarts
//! it), and answers `deploying` at once (or, with `wait-ms`, once the system is on or that
//! long has passed): the engine follows the power-on with `status`, holding nothing while
//! a BMC takes its time. `undeploy` powers it off and ejects both. `status` reads the
//! system's `PowerState` and `Status` and which image is inserted; a system found off with
//! the instance's media counts as failed only when the engine checks a running instance's
//! health, and as still coming up while it follows the deployment.
//!
//! A tree master boots over the network instead: `deploy` sets a one-time boot override to
//! `Pxe` and powers the system on (or restarts it); the engine's boot listener, DHCP and
//! mint's boot stage do the rest, and `status` reads the boot stage's report in the
//! descriptor (`booted`). `undeploy` powers it off; there is no media to eject.
//!
//! The driver never sees the BMC's credentials: the host adds them to requests to exactly
//! the node's endpoint, from the operator's credentials file.

use mint_sdk::driver::{Deployment, Driver, InstanceState, Node, StatusReport, checking_health};
use mint_sdk::http::{HttpError, Method, Request, Response};
use mint_sdk::{Config, Error};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The driver; see the crate documentation.
pub struct Redfish;

/// One node's BMC: where it is and how long to wait for it.
struct Bmc<'a> {
    node: &'a Node,
    /// `scheme://host:port`.
    base: String,
    /// The system's resource path, `/redfish/v1/Systems/<id>`.
    system: String,
    timeout: Duration,
}

/// The two virtual-media devices an instance uses.
struct Media {
    boot: Device,
    seed: Device,
}

struct Device {
    path: String,
    image: Option<String>,
    inserted: bool,
    /// Whether the BMC may present it as a floppy (it lists `Floppy` among its media
    /// types), so that what goes on it must fit one.
    floppy: bool,
}

/// What a 3.5-inch floppy holds: the most a seed on a floppy device may be.
const FLOPPY_BYTES: u64 = 1_474_560;

impl<'a> Bmc<'a> {
    fn of(node: &'a Node, config: &Config) -> Result<Bmc<'a>, Error> {
        let url = node.require_property("bmc-url")?.trim_end_matches('/');
        let bad = || {
            Error::invalid_input(format!(
                "node `{}`: property `bmc-url` = `{url}` must be the system's Redfish resource, such as `https://10.1.0.17/redfish/v1/Systems/1`",
                node.name
            ))
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let at = rest.find('/').ok_or_else(bad)?;
        let system = rest[at..].to_string();
        if !system.starts_with("/redfish/v1/Systems/")
            || system.len() <= "/redfish/v1/Systems/".len()
        {
            return Err(bad());
        }
        let timeout = Duration::from_millis(
            config
                .get_or("request-timeout-ms", 5_000u64)?
                .clamp(100, 60_000),
        );
        Ok(Bmc {
            node,
            base: format!("{scheme}://{}", &rest[..at]),
            system,
            timeout,
        })
    }

    /// Sends one request and turns every way it can fail into an error that names the
    /// node, the BMC and what to check.
    fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Response, Error> {
        let url = format!("{}{path}", self.base);
        let request = match body {
            Some(b) => Request::json(method, &url, b),
            None => Request::new(method, &url),
        };
        let who = format!("node `{}`: the BMC at {}", self.node.name, self.base);
        let answer = request.header("accept", "application/json").timeout(self.timeout).send().map_err(|e| match e {
            HttpError::Timeout => Error::external(format!("{who} did not answer {method} {path} within {} ms", self.timeout.as_millis())),
            HttpError::Denied => Error::external(format!("{who}: the host refused the request; `bmc-url` must name the BMC this node's requests go to")),
            other => Error::external(format!("{who} cannot be reached for {method} {path}: {other}")),
        })?;
        if answer.is_success() {
            return Ok(answer);
        }
        let said = redfish_message(&answer)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        Err(Error::external(match answer.status {
            401 => format!(
                "{who} refused the credentials for {method} {path} (401 Unauthorized); set this node's BMC user and password in the daemon's credentials file"
            ),
            403 => format!(
                "{who} forbids {method} {path} (403) to the configured BMC user; give that user the operator role"
            ),
            404 => {
                format!("{who} has no {path} (404 Not Found); check the node's `bmc-url` property")
            }
            s if s >= 500 => format!("{who} failed {method} {path} ({s}){said}"),
            s => format!("{who} refused {method} {path} ({s}){said}"),
        }))
    }

    fn get(&self, path: &str) -> Result<Value, Error> {
        let answer = self.send(Method::Get, path, None)?;
        answer.json().map_err(|e| {
            Error::external(format!(
                "node `{}`: the BMC at {} answered GET {path} with {e}",
                self.node.name, self.base
            ))
        })
    }

    fn post(&self, path: &str, body: Value) -> Result<(), Error> {
        self.send(Method::Post, path, Some(&body)).map(|_| ())
    }

    fn system(&self) -> Result<Value, Error> {
        self.get(&self.system)
    }

    /// The system's virtual-media devices: from the system's own `VirtualMedia`
    /// collection, or its manager's (older BMCs keep them there).
    fn media(&self, system: &Value) -> Result<Media, Error> {
        let collection = match odata_id(&system["VirtualMedia"]) {
            Some(p) => p,
            None => {
                let manager = odata_id(&system["Links"]["ManagedBy"][0])
                    .ok_or_else(|| self.lacks("a VirtualMedia collection or a manager"))?;
                odata_id(&self.get(&manager)?["VirtualMedia"])
                    .ok_or_else(|| self.lacks("virtual media"))?
            }
        };
        let members = self.get(&collection)?["Members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (mut boot, mut seed) = (None, None);
        for m in members {
            let Some(path) = odata_id(&m) else { continue };
            let d = self.get(&path)?;
            let types: Vec<&str> = d["MediaTypes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let device = Device {
                path,
                image: d["Image"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                inserted: d["Inserted"].as_bool().unwrap_or(false),
                floppy: types.contains(&"Floppy"),
            };
            if boot.is_none() && types.iter().any(|t| *t == "CD" || *t == "DVD") {
                boot = Some(device);
            } else if types.iter().any(|t| *t == "USBStick" || *t == "Floppy") {
                // A USB stick without a floppy's limit is the better place for a seed.
                let better = seed
                    .as_ref()
                    .is_none_or(|s: &Device| s.floppy && !device.floppy);
                if better {
                    seed = Some(device);
                }
            }
        }
        match (boot, seed) {
            (Some(boot), Some(seed)) => Ok(Media { boot, seed }),
            (None, _) => {
                Err(self.lacks("a CD or DVD virtual-media device to boot the instance's disk from"))
            }
            (_, None) => {
                Err(self
                    .lacks("a USB stick or floppy virtual-media device for the instance's seed"))
            }
        }
    }

    fn lacks(&self, what: &str) -> Error {
        Error::external(format!(
            "node `{}`: the BMC at {} offers no {what} for {}",
            self.node.name, self.base, self.system
        ))
    }

    /// Makes `device` hold `image`, ejecting another image first.
    fn insert(&self, device: &Device, image: &str) -> Result<(), Error> {
        if device.inserted && device.image.as_deref() == Some(image) {
            return Ok(());
        }
        if device.inserted {
            self.post(
                &format!("{}/Actions/VirtualMedia.EjectMedia", device.path),
                json!({}),
            )?;
        }
        self.post(
            &format!("{}/Actions/VirtualMedia.InsertMedia", device.path),
            json!({ "Image": image, "Inserted": true, "WriteProtected": true }),
        )
    }

    fn eject(&self, device: &Device) -> Result<(), Error> {
        if device.inserted || device.image.is_some() {
            self.post(
                &format!("{}/Actions/VirtualMedia.EjectMedia", device.path),
                json!({}),
            )?;
        }
        Ok(())
    }

    fn reset(&self, kind: &str) -> Result<(), Error> {
        self.post(
            &format!("{}/Actions/ComputerSystem.Reset", self.system),
            json!({ "ResetType": kind }),
        )
    }
}

fn odata_id(v: &Value) -> Option<String> {
    v["@odata.id"].as_str().map(str::to_string)
}

/// The message of a Redfish error body (`{"error": {"message": ...}}`), if there is one.
fn redfish_message(r: &Response) -> Option<String> {
    let v: Value = r.json().ok()?;
    let e = &v["error"];
    let m = e["@Message.ExtendedInfo"][0]["Message"]
        .as_str()
        .or(e["message"].as_str())?;
    Some(m.chars().take(300).collect())
}

/// The URLs of the instance's ISO master and seed, which the artifact server serves as
/// parts of the deployment's artifact.
fn images(d: &Deployment) -> Result<(String, String), Error> {
    if d.artifact.format != "iso" && d.artifact.format != "disk" {
        return Err(Error::invalid_input(format!(
            "tier `{}` runs a `{}` master; the redfish driver boots ISO images from virtual media, writes raw disks through mint's deploy ISO and boots tree masters over the network",
            d.tier, d.artifact.format
        )));
    }
    let base = artifact_url(d)?;
    Ok((format!("{base}/master"), format!("{base}/seed")))
}

/// The answer for a system whose media are another instance's (or none).
fn not_this_instance(media: &Media) -> StatusReport {
    let holds = media
        .seed
        .image
        .as_deref()
        .or(media.boot.image.as_deref())
        .unwrap_or("no media");
    StatusReport::new(
        InstanceState::Absent,
        format!("the system holds {holds}, not this instance"),
    )
}

/// The answer for a system its BMC reports in Critical health.
fn critical(power: &str) -> StatusReport {
    StatusReport::new(
        InstanceState::Failed,
        format!("the BMC reports the system's health Critical (power {power})"),
    )
}

/// The instance's state from the system's resource and its media.
fn report(
    system: &Value,
    media: &Media,
    boot: &str,
    seed: &str,
    health_check: bool,
) -> StatusReport {
    let ours = media.boot.inserted
        && media.boot.image.as_deref() == Some(boot)
        && media.seed.inserted
        && media.seed.image.as_deref() == Some(seed);
    let power = system["PowerState"].as_str().unwrap_or("unknown");
    let health = system["Status"]["Health"].as_str().unwrap_or("OK");
    if !ours {
        return not_this_instance(media);
    }
    if health == "Critical" {
        return critical(power);
    }
    match power {
        "On" => StatusReport::new(
            InstanceState::Running,
            format!("power On, health {health}, booted from {boot}"),
        ),
        "PoweringOn" => StatusReport::new(InstanceState::Deploying, "powering on"),
        // A BMC clears a one-time boot override when the system boots from it: while it is
        // still set, the power-on deploy asked for has not happened yet. Once it is gone,
        // a system that is off was switched off after it ran.
        other if boot_pending(system) => StatusReport::new(
            InstanceState::Deploying,
            format!("powered {other}; the one-time boot from the instance's CD is still pending"),
        ),
        other if health_check => StatusReport::new(
            InstanceState::Failed,
            format!("the system is powered {other} with this instance's media inserted"),
        ),
        // Some BMCs clear the override before they report the power-on: while the engine
        // follows the deployment, its deploy timeout decides, not one reading.
        other => StatusReport::new(
            InstanceState::Deploying,
            format!("powered {other}; waiting for the power-on the deployment asked for"),
        ),
    }
}

/// Whether the system still holds a one-time boot override to the CD.
fn boot_pending(system: &Value) -> bool {
    system["Boot"]["BootSourceOverrideEnabled"] == "Once"
        && system["Boot"]["BootSourceOverrideTarget"] == "Cd"
}

/// Reads the artifact's descriptor from the engine (the host lets a driver read the
/// artifact it deploys) and checks that the seed fits the device it goes on.
fn check_seed_fits(d: &Deployment, device: &Device) -> Result<(), Error> {
    if !device.floppy {
        return Ok(());
    }
    seed_fits(d, &descriptor(d)?)
}

/// The deployment's artifact descriptor, from the engine (the host lets a driver read the
/// artifact it deploys).
fn descriptor(d: &Deployment) -> Result<Value, Error> {
    let answer = Request::get(&d.artifact.url)
        .header("accept", "application/json")
        .timeout(Duration::from_secs(10))
        .send()
        .map_err(|e| {
            Error::external(format!(
                "cannot read the artifact descriptor {}: {e}",
                d.artifact.url
            ))
        })?;
    if !answer.is_success() {
        return Err(Error::external(format!(
            "the engine answered {} for the artifact descriptor {}",
            answer.status, d.artifact.url
        )));
    }
    answer
        .json()
        .map_err(|e| Error::external(format!("the artifact descriptor {}: {e}", d.artifact.url)))
}

/// Whether the seed the descriptor lists fits a floppy.
fn seed_fits(d: &Deployment, v: &Value) -> Result<(), Error> {
    let size = v["parts"]
        .as_array()
        .and_then(|parts| parts.iter().find(|p| p["role"] == "seed"))
        .and_then(|p| p["size"].as_u64())
        .unwrap_or(0);
    if size > FLOPPY_BYTES {
        return Err(Error::invalid_input(format!(
            "{}/{}: the instance's seed is {size} bytes, more than the {FLOPPY_BYTES} a floppy holds, and the BMC offers its seed device as a floppy; make the customizers' files smaller (they travel in the seed as write_files), or use a BMC that offers a USB stick",
            d.tier, d.index
        )));
    }
    Ok(())
}

/// Where a disk deployment's media are: the deploy ISO and its configuration (while the
/// deploy system writes the master to the server's disk), then the seed (once it boots
/// from that disk).
struct DiskPlan {
    deploy_iso: String,
    config: String,
    seed: String,
}

/// The plan of a disk deployment, refused (naming the fix) where it cannot work: a disk is
/// never put on a virtual CD, so the engine must serve the deploy ISO, and the deploy
/// system writes raw disks.
fn disk_plan(d: &Deployment, desc: &Value) -> Result<DiskPlan, Error> {
    let master = desc["parts"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["role"] == "master"))
        .cloned()
        .unwrap_or_default();
    if master["name"]
        .as_str()
        .is_some_and(|n| n.ends_with(".qcow2"))
    {
        return Err(Error::invalid_input(format!(
            "tier `{}` runs a qcow2 master; the deploy system writes raw disks: convert it (`qemu-img convert -O raw master.qcow2 master.raw`), import the raw disk and move the tier to it (`mint tier update-image`)",
            d.tier
        )));
    }
    if desc["deploy"].is_null() {
        return Err(Error::invalid_input(format!(
            "tier `{}` runs a disk master; a BMC boots only ISO images from virtual media, so the redfish driver never puts a disk on a virtual CD: it writes the disk through mint's deploy ISO, which this engine does not serve. Build it (`cargo xtask deploy-iso`) and give the daemon `[deploy] iso = \"FILE\"`, or import an ISO master",
            d.tier
        )));
    }
    let base = d.artifact.url.trim_end_matches('/');
    Ok(DiskPlan {
        deploy_iso: format!("{base}/deploy-iso"),
        config: format!("{base}/deploy-config"),
        seed: format!("{base}/seed"),
    })
}

fn holds(device: &Device, image: &str) -> bool {
    device.inserted && device.image.as_deref() == Some(image)
}

/// A disk deployment's state from the system, its media and the deploy system's report;
/// and the one step the driver takes itself: once the deploy system has written the disk
/// and powered the server off, the deploy media go, the seed goes in, and the server boots
/// from its disk.
fn disk_status(
    bmc: &Bmc,
    system: &Value,
    media: &Media,
    plan: &DiskPlan,
    desc: &Value,
    health_check: bool,
) -> Result<StatusReport, Error> {
    let power = system["PowerState"].as_str().unwrap_or("unknown");
    let health = system["Status"]["Health"].as_str().unwrap_or("OK");
    if holds(&media.boot, &plan.deploy_iso) && holds(&media.seed, &plan.config) {
        let written = &desc["written"];
        if written["ok"] == false {
            return Ok(StatusReport::new(
                InstanceState::Failed,
                format!(
                    "the deploy system could not write the disk: {}",
                    written["error"].as_str().unwrap_or("no reason given")
                ),
            ));
        }
        if written["ok"] != true {
            return Ok(match power {
                "On" => StatusReport::new(
                    InstanceState::Deploying,
                    "the deploy system is writing the master to the server's disk",
                ),
                other => StatusReport::new(
                    InstanceState::Deploying,
                    format!("powered {other}; the deploy ISO boots next"),
                ),
            });
        }
        let what = format!(
            "{} bytes written to {} in {} ms",
            written["bytes"],
            written["target"].as_str().unwrap_or("the disk"),
            written["fetch-write-ms"]
        );
        if power != "Off" {
            return Ok(StatusReport::new(
                InstanceState::Deploying,
                format!("{what}; waiting for the deploy system to power off"),
            ));
        }
        bmc.eject(&media.boot)?;
        bmc.insert(&media.seed, &plan.seed)?;
        bmc.send(Method::Patch, &bmc.system, Some(&json!({ "Boot": { "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Continuous" } })))?;
        bmc.reset("On")?;
        return Ok(StatusReport::new(
            InstanceState::Deploying,
            format!("{what}; booting from the disk"),
        ));
    }
    if !(holds(&media.seed, &plan.seed) && !media.boot.inserted) {
        return Ok(not_this_instance(media));
    }
    if health == "Critical" {
        return Ok(critical(power));
    }
    Ok(match power {
        "On" => StatusReport::new(
            InstanceState::Running,
            format!("power On, health {health}, booted from its disk"),
        ),
        other if health_check => StatusReport::new(
            InstanceState::Failed,
            format!("the system is powered {other} with this instance's disk and seed"),
        ),
        other => StatusReport::new(
            InstanceState::Deploying,
            format!("powered {other}; booting from its disk"),
        ),
    })
}

/// Deploys a disk instance: the deploy ISO on the CD and its configuration on the seed
/// device, a one-time boot from the CD, power on. The rest happens in [`disk_status`].
fn deploy_disk(node: &Node, d: &Deployment, config: &Config) -> Result<StatusReport, Error> {
    let desc = descriptor(d)?;
    let plan = disk_plan(d, &desc)?;
    let bmc = Bmc::of(node, config)?;
    let system = bmc.system()?;
    let media = bmc.media(&system)?;
    if media.seed.floppy {
        seed_fits(d, &desc)?;
    }
    // Deploying again what is under way or runs (after an engine restart) changes nothing.
    let now = disk_status(&bmc, &system, &media, &plan, &desc, false)?;
    if now.state != InstanceState::Absent {
        return Ok(now);
    }
    bmc.insert(&media.seed, &plan.config)?;
    bmc.insert(&media.boot, &plan.deploy_iso)?;
    bmc.send(
        Method::Patch,
        &bmc.system,
        Some(&json!({ "Boot": { "BootSourceOverrideTarget": "Cd", "BootSourceOverrideEnabled": "Once" } })),
    )?;
    let on = system["PowerState"].as_str() == Some("On");
    bmc.reset(if on { "ForceRestart" } else { "On" })?;
    Ok(StatusReport::new(
        InstanceState::Deploying,
        "the deploy ISO is booting; it writes the master to the server's disk",
    ))
}

/// A tree instance boots over the network: the engine's iPXE script for the node's MAC
/// boots mint's boot stage, which fetches the instance into memory. The BMC only powers
/// the system on with a one-time boot from the network.
fn deploy_netboot(node: &Node, d: &Deployment, config: &Config) -> Result<StatusReport, Error> {
    artifact_url(d)?;
    let bmc = Bmc::of(node, config)?;
    let system = bmc.system()?;
    let now = netboot_report(&system, &descriptor(d)?, false);
    if now.state == InstanceState::Running {
        return Ok(now);
    }
    bmc.send(
        Method::Patch,
        &bmc.system,
        Some(&json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } })),
    )?;
    let on = system["PowerState"].as_str() == Some("On");
    bmc.reset(if on { "ForceRestart" } else { "On" })?;
    Ok(StatusReport::new(
        InstanceState::Deploying,
        "network boot requested: the system boots the engine's iPXE script for its MAC",
    ))
}

/// A network-booted instance's state: the system's power and health, and what the boot
/// stage reported for this deployment (in the descriptor, under the deployment's
/// capability, so a report is always about this deployment).
fn netboot_report(system: &Value, desc: &Value, health_check: bool) -> StatusReport {
    let power = system["PowerState"].as_str().unwrap_or("unknown");
    let health = system["Status"]["Health"].as_str().unwrap_or("OK");
    let booted = &desc["booted"];
    if booted["ok"] == false {
        return StatusReport::new(
            InstanceState::Failed,
            format!(
                "the boot stage failed: {}",
                booted["error"].as_str().unwrap_or("no reason given")
            ),
        );
    }
    if health == "Critical" {
        return critical(power);
    }
    match (power, booted["ok"] == true) {
        ("On", true) => StatusReport::new(
            InstanceState::Running,
            format!("power On, health {health}, booted over the network"),
        ),
        ("On" | "PoweringOn", false) => StatusReport::new(
            InstanceState::Deploying,
            format!("power {power}; the boot stage has not reported yet"),
        ),
        (other, _) if boot_pending(system) => StatusReport::new(
            InstanceState::Deploying,
            format!("powered {other}; the one-time network boot is still pending"),
        ),
        (other, true) if health_check => StatusReport::new(
            InstanceState::Failed,
            format!("the system is powered {other} after it booted this instance"),
        ),
        (other, _) => StatusReport::new(
            InstanceState::Deploying,
            format!("powered {other}; waiting for the power-on the deployment asked for"),
        ),
    }
}

/// The deployment's artifact URL, which must be absolute for nodes to reach it.
fn artifact_url(d: &Deployment) -> Result<&str, Error> {
    if !d.artifact.url.contains("://") {
        return Err(Error::invalid_input(format!(
            "artifact URL `{}` is relative; start the daemon with --advertise-url so BMCs can fetch from it",
            d.artifact.url
        )));
    }
    Ok(d.artifact.url.trim_end_matches('/'))
}

impl Driver for Redfish {
    fn deploy(node: &Node, d: &Deployment, config: &Config) -> Result<StatusReport, Error> {
        if d.artifact.format == "tree" {
            return deploy_netboot(node, d, config);
        }
        if d.artifact.format == "disk" {
            images(d)?;
            return deploy_disk(node, d, config);
        }
        let (boot, seed) = images(d)?;
        let bmc = Bmc::of(node, config)?;
        let system = bmc.system()?;
        let media = bmc.media(&system)?;
        check_seed_fits(d, &media.seed)?;
        // Deploying again what already runs (after an engine restart) changes nothing.
        let now = report(&system, &media, &boot, &seed, false);
        if now.state == InstanceState::Running {
            return Ok(now);
        }
        bmc.insert(&media.seed, &seed)?;
        bmc.insert(&media.boot, &boot)?;
        bmc.send(
            Method::Patch,
            &bmc.system,
            Some(&json!({ "Boot": { "BootSourceOverrideTarget": "Cd", "BootSourceOverrideEnabled": "Once" } })),
        )?;
        let on = system["PowerState"].as_str() == Some("On");
        bmc.reset(if on { "ForceRestart" } else { "On" })?;
        // Wait for the system to come on only as long as the operator asks (by default not
        // at all), leaving time to answer before the call's limit.
        let wait = Duration::from_millis(config.get_or("wait-ms", 0u64)?.min(600_000));
        let poll = Duration::from_millis(config.get_or("poll-ms", 250u64)?.clamp(10, 10_000));
        let started = Instant::now();
        loop {
            if started.elapsed() >= wait || mint_sdk::remaining() < bmc.timeout + poll * 2 {
                return Ok(StatusReport::new(
                    InstanceState::Deploying,
                    format!(
                        "power-on requested {} ms ago; the engine follows it",
                        started.elapsed().as_millis()
                    ),
                ));
            }
            std::thread::sleep(poll);
            let system = bmc.system()?;
            if system["PowerState"].as_str() == Some("On") {
                let media = bmc.media(&system)?;
                return Ok(report(&system, &media, &boot, &seed, false));
            }
        }
    }

    fn undeploy(node: &Node, d: &Deployment, config: &Config) -> Result<(), Error> {
        let bmc = Bmc::of(node, config)?;
        let system = bmc.system()?;
        if system["PowerState"].as_str() != Some("Off") {
            bmc.reset("ForceOff")?;
        }
        // A network-booted instance holds no media.
        if d.artifact.format == "tree" {
            return Ok(());
        }
        let media = bmc.media(&system)?;
        bmc.eject(&media.boot)?;
        bmc.eject(&media.seed)
    }

    fn status(node: &Node, d: &Deployment, config: &Config) -> Result<StatusReport, Error> {
        if d.artifact.format == "tree" {
            artifact_url(d)?;
            let desc = descriptor(d)?;
            let system = Bmc::of(node, config)?.system()?;
            return Ok(netboot_report(&system, &desc, checking_health()));
        }
        let (boot, seed) = images(d)?;
        if d.artifact.format == "disk" {
            let desc = descriptor(d)?;
            let plan = disk_plan(d, &desc)?;
            let bmc = Bmc::of(node, config)?;
            let system = bmc.system()?;
            let media = bmc.media(&system)?;
            return disk_status(&bmc, &system, &media, &plan, &desc, checking_health());
        }
        let bmc = Bmc::of(node, config)?;
        let system = bmc.system()?;
        let media = bmc.media(&system)?;
        Ok(report(&system, &media, &boot, &seed, checking_health()))
    }
}

mint_sdk::export_driver!(Redfish);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::driver::Artifact;
    use mint_sdk::testing::with_http;

    fn node() -> Node {
        Node {
            name: "n1".into(),
            properties: vec![(
                "bmc-url".into(),
                "http://127.0.0.1:9/redfish/v1/Systems/s1".into(),
            )],
            labels: vec![],
        }
    }

    fn deployment(format: &str) -> Deployment {
        Deployment {
            tier: "web".into(),
            index: 2,
            hostname: "web-002".into(),
            artifact: Artifact {
                url: "http://127.0.0.1:7600/v1/artifacts/web/2".into(),
                digest: "sha256:00".into(),
                size: 0,
                format: format.into(),
            },
        }
    }

    fn answer(status: u16, body: &str) -> Result<Response, HttpError> {
        Ok(Response {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    fn media(boot: Option<&str>, seed: Option<&str>) -> Media {
        let device = |image: Option<&str>| Device {
            path: "/x".into(),
            image: image.map(str::to_string),
            inserted: image.is_some(),
            floppy: false,
        };
        Media {
            boot: device(boot),
            seed: device(seed),
        }
    }

    #[test]
    fn states_come_from_power_health_media_and_the_pending_boot() {
        let ours = media(Some("m"), Some("s"));
        let system = |power: &str, health: &str, enabled: &str| serde_json::json!({"PowerState": power, "Status": {"Health": health}, "Boot": {"BootSourceOverrideEnabled": enabled, "BootSourceOverrideTarget": "Cd"}});
        let state = |sys: Value, m: &Media| report(&sys, m, "m", "s", true).state;
        assert_eq!(
            state(system("On", "OK", "Disabled"), &ours),
            InstanceState::Running
        );
        assert_eq!(
            state(system("PoweringOn", "OK", "Once"), &ours),
            InstanceState::Deploying
        );
        assert_eq!(
            state(system("Off", "OK", "Once"), &ours),
            InstanceState::Deploying,
            "asked to boot, not yet booted"
        );
        assert_eq!(
            state(system("Off", "OK", "Disabled"), &ours),
            InstanceState::Failed,
            "switched off after it ran"
        );
        assert_eq!(
            state(system("On", "Critical", "Disabled"), &ours),
            InstanceState::Failed
        );
        assert_eq!(
            state(
                system("On", "OK", "Disabled"),
                &media(Some("other"), Some("s"))
            ),
            InstanceState::Absent
        );
        assert_eq!(
            state(system("On", "OK", "Disabled"), &media(None, None)),
            InstanceState::Absent
        );
        // Following a deployment, a system found off is still on its way up.
        assert_eq!(
            report(&system("Off", "OK", "Disabled"), &ours, "m", "s", false).state,
            InstanceState::Deploying
        );
    }

    #[test]
    fn a_seed_bigger_than_a_floppy_is_refused_naming_the_limit() {
        let descriptor = |size: u64| {
            format!(r#"{{"parts":[{{"role":"master","size":9}},{{"role":"seed","size":{size}}}]}}"#)
        };
        let floppy = Device {
            path: "/f".into(),
            image: None,
            inserted: false,
            floppy: true,
        };
        let usb = Device {
            path: "/u".into(),
            image: None,
            inserted: false,
            floppy: false,
        };
        let big = descriptor(2 << 20);
        let e = with_http(
            move |_| answer(200, &big),
            || check_seed_fits(&deployment("iso"), &floppy),
        )
        .unwrap_err();
        assert!(
            e.message.contains("1474560") && e.message.contains("web/2"),
            "{}",
            e.message
        );
        let fits = descriptor(FLOPPY_BYTES);
        with_http(
            move |_| answer(200, &fits),
            || check_seed_fits(&deployment("iso"), &floppy),
        )
        .unwrap();
        // A USB stick has no such limit, and nothing is asked.
        with_http(
            |r| panic!("no request expected, got {}", r.url()),
            || check_seed_fits(&deployment("iso"), &usb),
        )
        .unwrap();
    }

    #[test]
    fn a_disk_deployment_moves_from_the_deploy_iso_to_its_disk_once_written_and_off() {
        let n = node();
        let config = Config::new();
        let bmc = Bmc::of(&n, &config).unwrap();
        let plan = DiskPlan {
            deploy_iso: "c/deploy-iso".into(),
            config: "c/deploy-config".into(),
            seed: "c/seed".into(),
        };
        let device = |path: &str, image: Option<&str>, floppy: bool| Device {
            path: path.into(),
            image: image.map(str::to_string),
            inserted: image.is_some(),
            floppy,
        };
        let writing = || Media {
            boot: device("/cd", Some("c/deploy-iso"), false),
            seed: device("/fd", Some("c/deploy-config"), true),
        };
        let booted = || Media {
            boot: device("/cd", None, false),
            seed: device("/fd", Some("c/seed"), true),
        };
        let system = |power: &str| json!({"PowerState": power, "Status": {"Health": "OK"}});
        let quiet = |media: Media, power: &str, desc: Value, health: bool| {
            with_http(
                |r| panic!("no request expected, got {}", r.url()),
                || disk_status(&bmc, &system(power), &media, &plan, &desc, health),
            )
            .unwrap()
        };
        let r = quiet(writing(), "On", json!({}), false);
        assert_eq!(r.state, InstanceState::Deploying);
        assert!(r.detail.contains("writing the master"), "{}", r.detail);
        let failed = json!({"written": {"ok": false, "error": "no fixed disk holds the master"}});
        let r = quiet(writing(), "Off", failed, false);
        assert_eq!(r.state, InstanceState::Failed);
        assert!(
            r.detail.contains("no fixed disk holds the master"),
            "{}",
            r.detail
        );
        let written = json!({"written": {"ok": true, "bytes": 1000, "target": "/dev/vda", "fetch-write-ms": 5}});
        let r = quiet(writing(), "On", written.clone(), false);
        assert!(
            r.state == InstanceState::Deploying
                && r.detail
                    .contains("waiting for the deploy system to power off"),
            "{}",
            r.detail
        );

        // Written and off: the deploy ISO out, the seed in, the disk first, power on.
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = seen.clone();
        let r = with_http(
            move |req| {
                log.borrow_mut().push(format!(
                    "{:?} {}",
                    req.method(),
                    req.url().trim_start_matches("http://127.0.0.1:9")
                ));
                answer(204, "")
            },
            || disk_status(&bmc, &system("Off"), &writing(), &plan, &written, false),
        )
        .unwrap();
        assert!(
            r.state == InstanceState::Deploying && r.detail.contains("booting from the disk"),
            "{}",
            r.detail
        );
        assert_eq!(
            *seen.borrow(),
            [
                "Post /cd/Actions/VirtualMedia.EjectMedia",
                "Post /fd/Actions/VirtualMedia.EjectMedia",
                "Post /fd/Actions/VirtualMedia.InsertMedia",
                "Patch /redfish/v1/Systems/s1",
                "Post /redfish/v1/Systems/s1/Actions/ComputerSystem.Reset",
            ]
        );

        assert_eq!(
            quiet(booted(), "On", json!({}), true).state,
            InstanceState::Running
        );
        assert_eq!(
            quiet(booted(), "Off", json!({}), true).state,
            InstanceState::Failed,
            "off after it ran"
        );
        assert_eq!(
            quiet(booted(), "Off", json!({}), false).state,
            InstanceState::Deploying,
            "on its way up"
        );
        let other = Media {
            boot: device("/cd", None, false),
            seed: device("/fd", Some("other/seed"), true),
        };
        assert_eq!(
            quiet(other, "On", json!({}), true).state,
            InstanceState::Absent
        );
    }

    #[test]
    fn bmc_url_must_name_a_system() {
        let mut n = node();
        n.properties[0].1 = "http://127.0.0.1:9/redfish/v1".into();
        let e = Redfish::status(&n, &deployment("iso"), &Config::new()).unwrap_err();
        assert!(e.message.contains("`bmc-url`"), "{}", e.message);
    }

    #[test]
    fn a_tree_instance_boots_over_the_network_and_runs_once_its_boot_stage_reports() {
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = seen.clone();
        let r = with_http(
            move |req| {
                let url = req.url().to_string();
                log.borrow_mut().push(format!(
                    "{:?} {} {}",
                    req.method(),
                    url.trim_start_matches("http://127.0.0.1:9"),
                    String::from_utf8_lossy(req.body_bytes())
                ));
                if url.ends_with("/v1/artifacts/web/2") {
                    answer(200, r#"{"format":"tree","parts":[]}"#)
                } else if url.ends_with("/Systems/s1") && req.method() == Method::Get {
                    answer(200, r#"{"PowerState":"Off","Status":{"Health":"OK"}}"#)
                } else {
                    answer(204, "")
                }
            },
            || Redfish::deploy(&node(), &deployment("tree"), &Config::new()),
        )
        .unwrap();
        assert_eq!(r.state, InstanceState::Deploying, "{}", r.detail);
        let seen = seen.borrow();
        assert!(
            seen[2].starts_with("Patch /redfish/v1/Systems/s1 ")
                && seen[2].contains(r#""BootSourceOverrideTarget":"Pxe""#)
                && seen[2].contains(r#""BootSourceOverrideEnabled":"Once""#),
            "{seen:?}"
        );
        assert!(
            seen[3].contains("ComputerSystem.Reset") && seen[3].contains(r#""ResetType":"On""#),
            "{seen:?}"
        );
        assert_eq!(seen.len(), 4, "{seen:?}");
        let sys = |power: &str, enabled: &str| json!({"PowerState": power, "Status": {"Health": "OK"}, "Boot": {"BootSourceOverrideEnabled": enabled}});
        let booted = json!({"booted": {"ok": true}});
        let state = |s: Value, d: &Value, h: bool| netboot_report(&s, d, h).state;
        assert_eq!(
            state(sys("On", "Disabled"), &json!({}), false),
            InstanceState::Deploying
        );
        assert_eq!(
            state(sys("On", "Disabled"), &booted, true),
            InstanceState::Running
        );
        assert_eq!(
            state(sys("Off", "Once"), &json!({}), true),
            InstanceState::Deploying
        );
        assert_eq!(
            state(sys("Off", "Disabled"), &booted, true),
            InstanceState::Failed
        );
        let failed = json!({"booted": {"ok": false, "error": "the layer arrived damaged"}});
        let r = netboot_report(&sys("On", "Disabled"), &failed, false);
        assert!(
            r.state == InstanceState::Failed && r.detail.contains("the layer arrived damaged"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn disk_tiers_are_refused_before_the_bmc_is_asked() {
        // A disk master: the descriptor is read, and without a deploy ISO nothing else is asked.
        let e = with_http(
            |r| {
                assert!(
                    r.url().ends_with("/v1/artifacts/web/2"),
                    "only the descriptor: {}",
                    r.url()
                );
                answer(
                    200,
                    r#"{"format":"disk","parts":[{"role":"master","name":"x.raw","size":9}]}"#,
                )
            },
            || Redfish::deploy(&node(), &deployment("disk"), &Config::new()),
        )
        .unwrap_err();
        assert!(
            e.message.contains("never puts a disk on a virtual CD")
                && e.message.contains("cargo xtask deploy-iso"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bmc_failures_name_the_node_and_the_fix() {
        let cases: [(Result<Response, HttpError>, &str); 5] = [
            (answer(401, ""), "credentials file"),
            (answer(404, "{}"), "`bmc-url`"),
            (
                answer(500, r#"{"error":{"message":"flash busy"}}"#),
                "(500): flash busy",
            ),
            (answer(200, "{not json"), "malformed JSON"),
            (Err(HttpError::Timeout), "within 5000 ms"),
        ];
        for (reply, needle) in cases {
            let e = with_http(
                move |_| reply.clone(),
                || Redfish::status(&node(), &deployment("iso"), &Config::new()),
            )
            .unwrap_err();
            assert!(
                e.message.contains(needle) && e.message.contains("node `n1`"),
                "{needle}: {}",
                e.message
            );
        }
    }
}
