//! The `hosts` customizer: an `/etc/hosts` that lists every instance of the tier by its
//! pre-assigned address and host name. All K identities exist before any node is chosen,
//! so each instance can know its peers from the start, without DNS.
//!
//! The master's own lines are kept except its `127.0.1.1` line (the distribution's name
//! for the machine) and any block an earlier mint wrote; the peers follow in one block.
//! Configuration: `domain` (appended for fully qualified names).

use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit};
use mint_sdk::net::ToIpAddr;

/// The customizer; see the crate documentation.
pub struct Hosts;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    domain: Option<String>,
}

const BEGIN: &str = "# BEGIN mint peers";
const END: &str = "# END mint peers";

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Customizer for Hosts {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let s: Settings = cx.config.parse()?;
        if let Some(d) = &s.domain
            && !valid_domain(d)
        {
            return Err(Error::invalid_input(format!(
                "configuration key `domain`: `{d}` is not a DNS domain"
            )));
        }
        let master = cx.read_to_string("/etc/hosts")?.unwrap_or_else(|| {
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".into()
        });
        let mut out = String::new();
        let mut inside = false;
        for line in master.lines() {
            match line.trim() {
                l if l.starts_with(BEGIN) => inside = true,
                END => inside = false,
                l if inside || l.starts_with("127.0.1.1") => {}
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        let peers = cx.peers();
        out.push_str(&format!(
            "{BEGIN} (tier {}, {} instances)\n",
            cx.instance.tier,
            peers.len()
        ));
        for p in &peers {
            let names = match &s.domain {
                Some(d) => format!("{}.{d} {}", p.hostname, p.hostname),
                None => p.hostname.clone(),
            };
            out.push_str(&format!("{}\t{names}\n", p.address.to_ip()));
        }
        out.push_str(END);
        out.push('\n');
        Ok(vec![Edit::write("/etc/hosts", out, 0o644)])
    }
}

mint_sdk::export_customizer!(Hosts);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::Config;
    use mint_sdk::customizer::{IpAddress, Peer};
    use mint_sdk::testing::{Master, instance, written};

    fn peers(n: u32) -> Vec<Peer> {
        (0..n)
            .map(|i| {
                let ip: std::net::IpAddr = format!("198.18.0.{}", 10 + i).parse().unwrap();
                Peer {
                    index: i,
                    hostname: format!("web-{i}"),
                    address: IpAddress::from(ip),
                }
            })
            .collect()
    }

    #[test]
    fn lists_every_peer_and_keeps_the_masters_lines() {
        let m = Master::new().file("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n# BEGIN mint peers (old)\n1.2.3.4\tgone\n# END mint peers\n").peers(peers(3));
        let cfg = Config::from_json(r#"{"domain": "mint.test"}"#).unwrap();
        let e = m
            .customize::<Hosts>(&instance(1, "web-1", "198.18.0.11", 24), &cfg)
            .unwrap();
        let hosts = written(&e, "/etc/hosts").unwrap();
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n# BEGIN mint peers (tier test, 3 instances)\n198.18.0.10\tweb-0.mint.test web-0\n198.18.0.11\tweb-1.mint.test web-1\n198.18.0.12\tweb-2.mint.test web-2\n# END mint peers\n"
        );
    }

    #[test]
    fn refuses_a_bad_domain() {
        let cfg = Config::from_json(r#"{"domain": "bad domain"}"#).unwrap();
        assert!(
            Master::new()
                .customize::<Hosts>(&instance(0, "a", "198.18.0.1", 24), &cfg)
                .is_err()
        );
    }
}
