//! Simulated Redfish BMCs: one system each, on its own port, serving what the `redfish`
//! driver reads and does: the system (power, health, the one-time boot override), its two
//! virtual-media devices (a CD and a floppy), inserting and ejecting media, and resets.
//! Power comes on `power_on` after it is asked, as a real BMC's does (sushy-tools' fake
//! driver takes 1 to 11 s); a power-on fails at `failure_rate`, leaving the system's health
//! Critical. Requests are not authenticated: the simulator stands for load, not security.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the BMCs behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long after a power-on request the system is on.
    pub power_on: Duration,
    /// The share of power-ons that fail (0 to 1).
    pub failure_rate: f64,
    /// Seeds the failures.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            power_on: Duration::from_secs(10),
            failure_rate: 0.0,
            seed: 1,
        }
    }
}

#[derive(Debug, Default)]
struct Media {
    image: Option<String>,
    inserted: bool,
}

#[derive(Debug)]
struct System {
    on: bool,
    /// When a requested power-on lands.
    powering_on: Option<Instant>,
    boot_once: bool,
    critical: bool,
    cd: Media,
    floppy: Media,
}

/// One simulated BMC.
struct Bmc {
    system: Mutex<System>,
    options: Options,
    rng: Mutex<crate::Rng>,
    requests: std::sync::atomic::AtomicU64,
}

type Shared = Arc<Bmc>;

const SYSTEM: &str = "/redfish/v1/Systems/1";

impl Bmc {
    fn system(&self) -> std::sync::MutexGuard<'_, System> {
        let mut s = self.system.lock().unwrap_or_else(|p| p.into_inner());
        if s.powering_on.is_some_and(|at| Instant::now() >= at) {
            s.powering_on = None;
            s.on = true;
            // A BMC clears a one-time override once the system has booted from it.
            s.boot_once = false;
        }
        s
    }
}

async fn system(State(b): State<Shared>) -> Json<Value> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let s = b.system();
    let power = match (s.on, s.powering_on.is_some()) {
        (true, _) => "On",
        (false, true) => "PoweringOn",
        (false, false) => "Off",
    };
    Json(json!({
        "@odata.id": SYSTEM, "Id": "1", "PowerState": power,
        "Status": { "Health": if s.critical { "Critical" } else { "OK" } },
        "Boot": { "BootSourceOverrideEnabled": if s.boot_once { "Once" } else { "Disabled" }, "BootSourceOverrideTarget": if s.boot_once { "Cd" } else { "None" } },
        "VirtualMedia": { "@odata.id": format!("{SYSTEM}/VirtualMedia") },
    }))
}

async fn patch_system(State(b): State<Shared>, Json(v): Json<Value>) -> Json<Value> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = b.system();
    if let Some(e) = v["Boot"]["BootSourceOverrideEnabled"].as_str() {
        s.boot_once = e == "Once";
    }
    Json(json!({}))
}

async fn reset(State(b): State<Shared>, Json(v): Json<Value>) -> Json<Value> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fails = {
        let mut rng = b.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.unit() < b.options.failure_rate
    };
    let mut s = b.system();
    match v["ResetType"].as_str().unwrap_or_default() {
        "On" | "ForceRestart" | "GracefulRestart" => {
            s.on = false;
            s.critical = fails;
            s.powering_on = Some(Instant::now() + b.options.power_on);
        }
        _ => {
            s.on = false;
            s.powering_on = None;
            s.critical = false;
        }
    }
    Json(json!({}))
}

async fn media_collection(State(b): State<Shared>) -> Json<Value> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Json(json!({ "Members": [
        { "@odata.id": format!("{SYSTEM}/VirtualMedia/Cd") },
        { "@odata.id": format!("{SYSTEM}/VirtualMedia/Floppy") },
    ]}))
}

fn device<'a>(s: &'a mut System, name: &str) -> Option<&'a mut Media> {
    match name {
        "Cd" => Some(&mut s.cd),
        "Floppy" => Some(&mut s.floppy),
        _ => None,
    }
}

async fn media(
    State(b): State<Shared>,
    Path(dev): Path<String>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = b.system();
    let types = if dev == "Cd" {
        json!(["CD", "DVD"])
    } else {
        json!(["Floppy", "USBStick"])
    };
    let m = device(&mut s, &dev).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    Ok(Json(
        json!({ "Id": dev, "MediaTypes": types, "Image": m.image.clone().unwrap_or_default(), "Inserted": m.inserted }),
    ))
}

async fn media_action(
    State(b): State<Shared>,
    Path((dev, action)): Path<(String, String)>,
    Json(v): Json<Value>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    b.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = b.system();
    let m = device(&mut s, &dev).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    match action.as_str() {
        "VirtualMedia.InsertMedia" => {
            m.image = v["Image"].as_str().map(str::to_string);
            m.inserted = true;
        }
        "VirtualMedia.EjectMedia" => *m = Media::default(),
        _ => return Err(axum::http::StatusCode::NOT_FOUND),
    }
    Ok(Json(json!({})))
}

/// Running BMCs; dropping it stops them.
pub struct Bmcs {
    runtime: Option<tokio::runtime::Runtime>,
    bmcs: Vec<Shared>,
    /// Each BMC's system resource, as a node's `bmc-url`.
    pub urls: Vec<String>,
}

impl Drop for Bmcs {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Bmcs {
    /// Starts `count` BMCs, each with one system, powered off, holding no media.
    pub fn start(count: usize, options: Options) -> anyhow::Result<Bmcs> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listeners = runtime.block_on(crate::listeners(count))?;
        let mut bmcs = Vec::with_capacity(count);
        let mut urls = Vec::with_capacity(count);
        for (i, listener) in listeners.into_iter().enumerate() {
            let bmc = Arc::new(Bmc {
                system: Mutex::new(System {
                    on: false,
                    powering_on: None,
                    boot_once: false,
                    critical: false,
                    cd: Media::default(),
                    floppy: Media::default(),
                }),
                rng: Mutex::new(crate::Rng(
                    options
                        .seed
                        .wrapping_add(i as u64)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        | 1,
                )),
                options: options.clone(),
                requests: 0.into(),
            });
            urls.push(format!("http://{}{SYSTEM}", listener.local_addr()?));
            let app = Router::new()
                .route(SYSTEM, get(system).patch(patch_system))
                .route(
                    &format!("{SYSTEM}/Actions/ComputerSystem.Reset"),
                    post(reset),
                )
                .route(&format!("{SYSTEM}/VirtualMedia"), get(media_collection))
                .route(&format!("{SYSTEM}/VirtualMedia/{{dev}}"), get(media))
                .route(
                    &format!("{SYSTEM}/VirtualMedia/{{dev}}/Actions/{{action}}"),
                    post(media_action),
                )
                .with_state(bmc.clone());
            runtime.spawn(async move { axum::serve(listener, app).await });
            bmcs.push(bmc);
        }
        Ok(Bmcs {
            runtime: Some(runtime),
            bmcs,
            urls,
        })
    }

    /// How many systems are on.
    pub fn powered_on(&self) -> usize {
        self.bmcs.iter().filter(|b| b.system().on).count()
    }

    /// Requests the BMCs have answered.
    pub fn requests(&self) -> u64 {
        self.bmcs
            .iter()
            .map(|b| b.requests.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}
