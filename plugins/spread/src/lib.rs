//! The `spread` node-selection policy: spreads a tier's instances over failure domains
//! (by default zone, then rack), then prefers a node that caches the tier's master, then
//! the least loaded node.
//!
//! Configuration: `domains`, the label keys of the failure domains from widest to
//! narrowest (default `["zone", "rack"]`). A node without one of the labels counts as its
//! own unnamed domain at that level.

use mint_sdk::policy::{Candidate, Choice, Policy, Request};
use mint_sdk::{Config, Error};
use std::collections::HashMap;

/// The policy; see the crate documentation.
pub struct Spread;

/// A failure domain: a node's label values along the configured keys, from the widest
/// level to this one, interned as a dense integer so that counting and comparing domains
/// costs no allocation. Rack r1 in zone a and rack r1 in zone b are different domains.
type DomainId = u32;

struct Domains {
    keys: Vec<Option<u32>>,
    /// (parent domain, label value at this level) to domain.
    ids: HashMap<(DomainId, Option<u32>), DomainId>,
}

const ROOT: DomainId = DomainId::MAX;

impl Domains {
    /// The domain ids of a node at each level, written into `out`.
    fn path(&mut self, label: impl Fn(u32) -> Option<u32>, out: &mut Vec<DomainId>) {
        out.clear();
        let mut parent = ROOT;
        for key in &self.keys {
            let next = self.ids.len() as DomainId;
            parent = *self
                .ids
                .entry((parent, key.and_then(&label)))
                .or_insert(next);
            out.push(parent);
        }
    }
}

/// Eligible nodes sharing the same narrowest domain, best first.
struct Group {
    path: Vec<DomainId>,
    nodes: Vec<usize>,
    next: usize,
}

/// The configured failure-domain label keys, widest first.
pub fn domain_keys(config: &Config) -> Result<Vec<String>, Error> {
    config.get_or("domains", vec!["zone".to_string(), "rack".to_string()])
}

impl Policy for Spread {
    fn select(request: &Request, config: &Config) -> Result<Vec<Choice>, Error> {
        let key_names = domain_keys(config)?;
        let mut domains = Domains {
            keys: key_names.iter().map(|k| request.key(k)).collect(),
            ids: HashMap::new(),
        };
        let mut path = Vec::with_capacity(domains.keys.len());

        // Instances already placed count against their domains, so a scale-out fills the
        // domains the tier has least of. Counts are indexed by domain id.
        let mut placed: Vec<u32> = Vec::new();
        let bump = |placed: &mut Vec<u32>, d: DomainId| {
            if placed.len() <= d as usize {
                placed.resize(d as usize + 1, 0);
            }
            placed[d as usize] += 1;
        };
        for p in &request.placed {
            domains.path(|k| p.label(k), &mut path);
            for &d in &path {
                bump(&mut placed, d);
            }
        }

        let mut groups: Vec<Group> = Vec::new();
        let mut group_of: HashMap<DomainId, usize> = HashMap::new();
        for (index, c) in request.eligible() {
            domains.path(|k| request.label(c, k), &mut path);
            let leaf = path.last().copied().unwrap_or(ROOT);
            let g = *group_of.entry(leaf).or_insert_with(|| {
                groups.push(Group {
                    path: path.clone(),
                    nodes: Vec::new(),
                    next: 0,
                });
                groups.len() - 1
            });
            groups[g].nodes.push(index);
        }
        placed.resize(domains.ids.len(), 0);
        let load = |i: usize| request.candidates[i].load;
        // A node that has the master fetches only the instance's part.
        let fetches = |i: usize| !request.has_master_cached(&request.candidates[i]);
        for g in &mut groups {
            // Candidates arrive in name order, so a stable sort keeps ties by name.
            g.nodes.sort_by_key(|&i| (fetches(i), load(i)));
        }

        let want = request.count as usize;
        let mut chosen = Vec::with_capacity(want);
        let mut before = Vec::with_capacity(domains.keys.len());
        while chosen.len() < want {
            // The group whose domains hold the fewest instances, widest level first; then
            // the least loaded node; then name order.
            let best = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.next < g.nodes.len())
                .min_by(|(_, a), (_, b)| {
                    let counts = |g: &Group| {
                        g.path
                            .iter()
                            .map(|&d| placed[d as usize])
                            .collect::<SmallCounts>()
                    };
                    counts(a)
                        .cmp(&counts(b))
                        .then(fetches(a.nodes[a.next]).cmp(&fetches(b.nodes[b.next])))
                        .then(load(a.nodes[a.next]).cmp(&load(b.nodes[b.next])))
                        .then(a.nodes[a.next].cmp(&b.nodes[b.next]))
                });
            let Some((gi, _)) = best else { break };
            let g = &mut groups[gi];
            let index = g.nodes[g.next];
            g.next += 1;
            before.clear();
            before.extend(g.path.iter().map(|&d| placed[d as usize]));
            for &d in &g.path {
                placed[d as usize] += 1;
            }
            chosen.push(choice(request, &key_names, &domains.keys, index, &before));
        }
        request.require_count(&chosen)?;
        Ok(chosen)
    }
}

/// Per-level instance counts of a group, compared lexicographically without allocating
/// for up to four levels.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct SmallCounts([u32; 4], Vec<u32>);

impl FromIterator<u32> for SmallCounts {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut fixed = [0u32; 4];
        let mut rest = Vec::new();
        for (i, n) in iter.into_iter().enumerate() {
            if i < 4 {
                fixed[i] = n;
            } else {
                rest.push(n);
            }
        }
        SmallCounts(fixed, rest)
    }
}

fn choice(
    request: &Request,
    names: &[String],
    keys: &[Option<u32>],
    index: usize,
    before: &[u32],
) -> Choice {
    let c: &Candidate = &request.candidates[index];
    let mut reason = String::new();
    for ((name, key), n) in names.iter().zip(keys).zip(before) {
        let value = key
            .and_then(|k| request.label(c, k))
            .map(|v| request.value_name(v))
            .unwrap_or("-");
        reason.push_str(&format!("{name}={value} had {n}; "));
    }
    reason.push_str(&format!("load {}.{:03}", c.load / 1000, c.load % 1000));
    // Fewer instances already in the node's domains scores higher.
    let score = -(before.iter().map(|&n| n as f64).sum::<f64>()) - c.load as f64 / 1000.0;
    Choice::new(index).with_score(score).with_reason(reason)
}

mint_sdk::export_policy!(Spread);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::testing::RequestBuilder;

    fn names<'a>(r: &'a mint_sdk::testing::TestRequest, c: &[Choice]) -> Vec<&'a str> {
        r.names_of(c)
    }

    #[test]
    fn spreads_over_zones_then_racks_then_load() {
        let r = RequestBuilder::new("web", 4)
            .node("a1", &[("zone", "a"), ("rack", "r1")], 500)
            .node("a2", &[("zone", "a"), ("rack", "r1")], 100)
            .node("a3", &[("zone", "a"), ("rack", "r2")], 900)
            .node("b1", &[("zone", "b"), ("rack", "r1")], 0)
            .node("b2", &[("zone", "b"), ("rack", "r1")], 0)
            .build();
        let c = Spread::select(&r, &Config::new()).unwrap();
        // Zone a and zone b alternate; inside zone a both racks get one before either gets two.
        assert_eq!(names(&r, &c), ["b1", "a2", "a3", "b2"]);
        assert!(c[0].reason.as_deref().unwrap().contains("zone=b had 0"));
    }

    #[test]
    fn prefers_nodes_that_cache_the_master_within_a_domain_count() {
        let r = RequestBuilder::new("web", 2)
            .node("a1", &[("zone", "a")], 0)
            .node("a2", &[("zone", "a"), ("mint.cached-master", "true")], 500)
            .node("b1", &[("zone", "b")], 0)
            .node("b2", &[("zone", "b"), ("mint.cached-master", "true")], 900)
            .build();
        // Both zones get one (spreading comes first); in each, the node with the master.
        let mut got = names(&r, &Spread::select(&r, &Config::new()).unwrap());
        got.sort();
        assert_eq!(got, ["a2", "b2"]);
    }

    #[test]
    fn counts_instances_already_placed() {
        let r = RequestBuilder::new("web", 1)
            .node("a1", &[("zone", "a")], 0)
            .node("b1", &[("zone", "b")], 999)
            .placed(&[("zone", "a")])
            .build();
        assert_eq!(
            names(&r, &Spread::select(&r, &Config::new()).unwrap()),
            ["b1"]
        );
    }

    #[test]
    fn skips_ineligible_and_reports_shortfall() {
        let r = RequestBuilder::new("web", 2)
            .node_with("small", &[], 1, 1024, 0)
            .node_with("big", &[], 8, 16384, 0)
            .require_resources(4, 4096)
            .build();
        let e = Spread::select(&r, &Config::new()).unwrap_err();
        assert_eq!(e.kind, mint_sdk::ErrorKind::Unsatisfiable);
        assert!(e.message.contains("only 1 of 2"), "{}", e.message);
    }

    #[test]
    fn honours_configured_domains_and_rejects_bad_config() {
        let r = RequestBuilder::new("web", 2)
            .node("a", &[("zone", "z"), ("row", "1")], 0)
            .node("b", &[("zone", "z"), ("row", "1")], 1)
            .node("c", &[("zone", "z"), ("row", "2")], 2)
            .build();
        let by_row = Config::from_json(r#"{"domains": ["row"]}"#).unwrap();
        assert_eq!(names(&r, &Spread::select(&r, &by_row).unwrap()), ["a", "c"]);
        let bad = Config::from_json(r#"{"domains": "row"}"#).unwrap();
        assert!(
            Spread::select(&r, &bad)
                .unwrap_err()
                .message
                .contains("`domains`")
        );
    }
}
