//! A policy that never returns, to check the CPU deadline.
use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
struct Spins;
impl Policy for Spins {
    fn select(request: &Request, _: &Config) -> Result<Vec<Choice>, Error> {
        let mut x = request.count as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}
mint_sdk::export_policy!(Spins);
