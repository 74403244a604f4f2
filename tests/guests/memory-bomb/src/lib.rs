//! A policy that allocates without bound, to check the memory limit.
use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
struct Bomb;
impl Policy for Bomb {
    fn select(_: &Request, _: &Config) -> Result<Vec<Choice>, Error> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}
mint_sdk::export_policy!(Bomb);
