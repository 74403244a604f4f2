//! mint's scale harness: simulated node agents and simulated Redfish BMCs, thousands in one
//! process, each on its own port on 127.0.0.1, so load tests and benchmarks can run a site
//! of 1,000 to 10,000 nodes on one machine.
//!
//! The simulated agents speak the real agent protocol: they are enrolled with an operator's
//! token, register with their join token (trading it for their credentials), heartbeat, and
//! serve `deploy`, `status` and `undeploy` over TLS under one self-signed certificate whose
//! pin they report. A deployment runs after a configurable delay, or fails at a configurable
//! rate. The simulated BMCs serve the part of Redfish the `redfish` driver uses: the system,
//! its virtual media, the one-time boot override and power, which comes on a configurable
//! delay after it is asked. Neither fetches artifacts: they stand for the control plane's
//! load, and the real agent and sushy-tools stay the correctness tests.

pub mod agents;
pub mod bmc;

/// A small deterministic generator, so a run's failures can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Binds `count` listeners on 127.0.0.1, each on a free port.
pub(crate) async fn listeners(count: usize) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    Ok(out)
}
