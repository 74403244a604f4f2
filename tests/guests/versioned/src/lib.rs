//! A policy whose behaviour its manifest's configuration sets, so that two packages of the
//! same component are two versions: `pick` chooses the `first` or `last` eligible
//! candidates, after working for `busy-ms` (to hold a call in flight while a test
//! replaces the plugin). Each choice's reason names the `pick`.
use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
struct Versioned;
impl Policy for Versioned {
    fn select(request: &Request, config: &Config) -> Result<Vec<Choice>, Error> {
        let pick: String = config.get_or("pick", "first".to_string())?;
        let busy = std::time::Duration::from_millis(config.get_or("busy-ms", 0u64)?);
        let started = std::time::Instant::now();
        while started.elapsed() < busy {
            std::hint::spin_loop();
        }
        let mut eligible: Vec<usize> = request.eligible().map(|(i, _)| i).collect();
        if pick == "last" {
            eligible.reverse();
        }
        let chosen: Vec<Choice> =
            eligible.into_iter().take(request.count as usize).map(|i| Choice::new(i).with_reason(format!("pick {pick}"))).collect();
        request.require_count(&chosen)?;
        Ok(chosen)
    }
}
mint_sdk::export_policy!(Versioned);
