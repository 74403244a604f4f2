//! A policy that panics, to check that a guest panic fails only its own call and that
//! the panic message reaches the operator.
use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
struct Panics;
impl Policy for Panics {
    fn select(request: &Request, _: &Config) -> Result<Vec<Choice>, Error> {
        panic!("deliberate panic while choosing {} nodes", request.count)
    }
}
mint_sdk::export_policy!(Panics);
