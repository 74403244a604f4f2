//! The `binpack` node-selection policy: packs a tier's instances into the failure domains
//! it already uses, and onto the smallest nodes that meet the requirements, keeping large
//! nodes and empty domains free for other tiers.
//!
//! Configuration: `domain`, the label key to pack by (default `rack`).

use mint_sdk::policy::{Choice, Policy, Request};
use mint_sdk::{Config, Error};
use std::collections::HashMap;

/// The policy; see the crate documentation.
pub struct Binpack;

impl Policy for Binpack {
    fn select(request: &Request, config: &Config) -> Result<Vec<Choice>, Error> {
        let key_name: String = config.get_or("domain", "rack".to_string())?;
        let key = request.key(&key_name);
        let domain_of = |labels: Option<u32>| labels;

        let mut used: HashMap<Option<u32>, u32> = HashMap::new();
        for p in &request.placed {
            *used
                .entry(domain_of(key.and_then(|k| p.label(k))))
                .or_default() += 1;
        }
        let r = &request.requirements;
        let mut eligible: Vec<(usize, Option<u32>, u64)> = request
            .eligible()
            .map(|(i, c)| {
                // Spare capacity over the requirement, cpus weighted like 4 GiB of memory.
                let spare = (c.cpus - r.min_cpus) as u64 * 4096 + (c.memory_mib - r.min_memory_mib);
                (i, domain_of(key.and_then(|k| request.label(c, k))), spare)
            })
            .collect();

        let want = request.count as usize;
        let mut chosen = Vec::with_capacity(want);
        while chosen.len() < want && !eligible.is_empty() {
            // The fullest domain first, then a node that caches the master (it fetches
            // only the instance's part), then the tightest fit, then name order.
            let (pos, _) = eligible
                .iter()
                .enumerate()
                .min_by_key(|(_, (i, d, spare))| {
                    let fetches = !request.has_master_cached(&request.candidates[*i]);
                    (
                        std::cmp::Reverse(used.get(d).copied().unwrap_or(0)),
                        fetches,
                        *spare,
                        *i,
                    )
                })
                .expect("eligible is not empty");
            let (index, domain, spare) = eligible.swap_remove(pos);
            let before = used.get(&domain).copied().unwrap_or(0);
            *used.entry(domain).or_default() += 1;
            let value = domain.map(|v| request.value_name(v)).unwrap_or("-");
            chosen.push(
                Choice::new(index)
                    .with_score(before as f64 - spare as f64 / 1e6)
                    .with_reason(format!("{key_name}={value} had {before}; spare {spare}")),
            );
        }
        request.require_count(&chosen)?;
        Ok(chosen)
    }
}

mint_sdk::export_policy!(Binpack);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::testing::RequestBuilder;

    #[test]
    fn packs_into_used_rack_then_tightest_fit() {
        let r = RequestBuilder::new("batch", 3)
            .node_with("big-r1", &[("rack", "r1")], 32, 65536, 0)
            .node_with("small-r1", &[("rack", "r1")], 4, 8192, 0)
            .node_with("small-r2", &[("rack", "r2")], 4, 8192, 0)
            .node_with("tiny-r3", &[("rack", "r3")], 2, 4096, 0)
            .placed(&[("rack", "r1")])
            .require_resources(2, 2048)
            .build();
        let c = Binpack::select(&r, &Config::new()).unwrap();
        assert_eq!(r.names_of(&c), ["small-r1", "big-r1", "tiny-r3"]);
    }

    #[test]
    fn refuses_when_too_few_fit() {
        let r = RequestBuilder::new("batch", 1)
            .node_with("tiny", &[], 1, 512, 0)
            .require_resources(2, 1024)
            .build();
        assert_eq!(
            Binpack::select(&r, &Config::new()).unwrap_err().kind,
            mint_sdk::ErrorKind::Unsatisfiable
        );
    }
}
