//! A policy that returns exactly the candidate indexes configured in `answer`, so tests
//! can hand the host unknown, duplicate, ineligible or miscounted choices; with
//! `refuse` set it returns that message as its own error instead.
use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
struct Echo;
impl Policy for Echo {
    fn select(_: &Request, config: &Config) -> Result<Vec<Choice>, Error> {
        if let Some(m) = config.get::<String>("refuse")? {
            return Err(Error::unsatisfiable(m));
        }
        let answer: Vec<u32> = config.get_or("answer", vec![])?;
        Ok(answer.into_iter().map(|i| Choice::new(i as usize)).collect())
    }
}
mint_sdk::export_policy!(Echo);
