//! Address plans: a subnet (IPv4 or IPv6), reserved ranges, a gateway and DNS servers,
//! and the deterministic order in which a tier's instances receive addresses.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A subnet: an address and a prefix length, normalised to its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

/// Why an address plan is not usable; each names the field and what would fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A field does not parse.
    #[error("field `{field}`: {message}")]
    Invalid {
        /// The field, as the tier file spells it.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The plan has fewer usable addresses than the tier's K.
    #[error(
        "the address plan {cidr} has {free} usable addresses left, fewer than the {wanted} instances asked for; widen `subnet` or lower `max-instances`"
    )]
    TooSmall {
        /// The subnet.
        cidr: Cidr,
        /// Usable addresses not taken by other tiers.
        free: u128,
        /// K.
        wanted: u64,
    },
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v) => (u32::from(v) as u128, 32),
        IpAddr::V6(v) => (u128::from(v), 128),
    }
}

fn from_bits(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((value as u32).into())
    } else {
        IpAddr::V6(value.into())
    }
}

impl Cidr {
    /// A subnet from an address and a prefix length; the host bits are cleared.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, String> {
        let (value, width) = bits(addr);
        if prefix_len > width {
            return Err(format!("prefix /{prefix_len} is longer than {width} bits"));
        }
        let mask = if prefix_len == 0 {
            0
        } else {
            u128::MAX << (width - prefix_len) & (u128::MAX >> (128 - width))
        };
        Ok(Cidr {
            network: from_bits(value & mask, width == 32),
            prefix_len,
        })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }
    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    fn width(&self) -> u8 {
        bits(self.network).1
    }
    /// The first and last address of the subnet, as integers.
    fn span(&self) -> (u128, u128) {
        let (start, width) = bits(self.network);
        let host_bits = width - self.prefix_len;
        let size_minus_one = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (start, start + size_minus_one)
    }
    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v, w) = bits(ip);
        let (a, b) = self.span();
        w == self.width() && a <= v && v <= b
    }
    /// Whether two subnets share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let ((a1, b1), (a2, b2)) = (self.span(), other.span());
        self.width() == other.width() && a1 <= b2 && a2 <= b1
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not in CIDR form, as in 198.18.0.0/24"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` in `{s}` is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("`/{len}` in `{s}` is not a prefix length"))?;
        let c = Cidr::new(addr, len)?;
        if c.network != addr {
            return Err(format!("`{s}` has host bits set; did you mean {c}?"));
        }
        Ok(c)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// An inclusive range of addresses a plan must not hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reserved {
    /// First reserved address.
    #[schema(value_type = String)]
    pub first: IpAddr,
    /// Last reserved address.
    #[schema(value_type = String)]
    pub last: IpAddr,
}

/// Where a tier's addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddressPlan {
    /// The subnet instances live in, as `ADDRESS/PREFIX`.
    #[schema(value_type = String)]
    pub subnet: Cidr,
    /// Ranges inside the subnet that are not for instances (routers, DHCP pools, ...).
    pub reserved: Vec<Reserved>,
    /// The default gateway, inside the subnet; never handed to an instance.
    #[schema(value_type = Option<String>)]
    pub gateway: Option<IpAddr>,
    /// DNS servers; one inside the subnet is never handed to an instance.
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<IpAddr>,
}

impl AddressPlan {
    /// Checks the plan's fields against each other: the gateway and reserved ranges inside
    /// the subnet, one address family throughout.
    pub fn check(&self) -> Result<(), PlanError> {
        let bad = |field, message| Err(PlanError::Invalid { field, message });
        if let Some(g) = self.gateway {
            if !self.subnet.contains(g) {
                return bad(
                    "gateway",
                    format!("{g} is outside the subnet {}", self.subnet),
                );
            }
        }
        for r in &self.reserved {
            if !self.subnet.contains(r.first) || !self.subnet.contains(r.last) {
                return bad(
                    "reserved",
                    format!(
                        "{}-{} is not inside the subnet {}",
                        r.first, r.last, self.subnet
                    ),
                );
            }
            if bits(r.first).0 > bits(r.last).0 {
                return bad(
                    "reserved",
                    format!("{}-{} ends before it starts", r.first, r.last),
                );
            }
        }
        Ok(())
    }

    fn excluded(&self, v: u128) -> bool {
        let (first, last) = self.subnet.span();
        let v4 = self.subnet.width() == 32;
        // IPv4 subnets wider than /31 lose their network and broadcast addresses; IPv6
        // subnets lose the subnet-router anycast address (the network address).
        if (v4 && self.subnet.prefix_len < 31 && (v == first || v == last)) || (!v4 && v == first) {
            return true;
        }
        let is = |ip: IpAddr| bits(ip).0 == v && bits(ip).1 == self.subnet.width();
        self.gateway.is_some_and(is)
            || self.dns.iter().copied().any(is)
            || self
                .reserved
                .iter()
                .any(|r| bits(r.first).0 <= v && v <= bits(r.last).0)
    }

    /// Usable addresses in order, lowest first, skipping `taken` ones (held by other
    /// tiers). Lazy: a /8 or an IPv6 /64 is never materialised.
    pub fn usable<'a>(
        &'a self,
        taken: &'a dyn Fn(IpAddr) -> bool,
    ) -> impl Iterator<Item = IpAddr> + 'a {
        let (first, last) = self.subnet.span();
        let v4 = self.subnet.width() == 32;
        (first..=last)
            .filter(move |&v| !self.excluded(v))
            .map(move |v| from_bits(v, v4))
            .filter(move |ip| !taken(*ip))
    }

    /// The first `k` usable addresses not `taken`, or [`PlanError::TooSmall`] saying how
    /// many there are.
    pub fn allocate(
        &self,
        k: u64,
        taken: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<IpAddr>, PlanError> {
        self.check()?;
        let got: Vec<IpAddr> = self.usable(taken).take(k as usize).collect();
        if (got.len() as u64) < k {
            return Err(PlanError::TooSmall {
                cidr: self.subnet,
                free: got.len() as u128,
                wanted: k,
            });
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(s: &str) -> AddressPlan {
        AddressPlan {
            subnet: s.parse().unwrap(),
            reserved: vec![],
            gateway: None,
            dns: vec![],
        }
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_refuses_cidrs_with_the_fix() {
        assert_eq!(
            "198.18.0.0/24".parse::<Cidr>().unwrap().to_string(),
            "198.18.0.0/24"
        );
        assert!(
            "198.18.0.7/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("did you mean 198.18.0.0/24")
        );
        assert!(
            "198.18.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("longer than 32")
        );
        assert!(
            "198.18.0.0"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("CIDR form")
        );
        assert!(
            "300.1.1.0/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an IP address")
        );
        assert_eq!("2001:db8::/64".parse::<Cidr>().unwrap().prefix_len(), 64);
    }

    #[test]
    fn overlap_and_containment() {
        let a: Cidr = "198.18.0.0/16".parse().unwrap();
        let b: Cidr = "198.18.4.0/24".parse().unwrap();
        let c: Cidr = "198.19.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(!a.overlaps(&"2001:db8::/32".parse().unwrap()));
        assert!(a.contains(ip("198.18.255.255")) && !a.contains(ip("198.19.0.0")));
    }

    #[test]
    fn allocation_skips_network_broadcast_gateway_dns_reserved_and_taken() {
        let mut p = plan("198.18.0.0/29"); // .0 to .7
        p.gateway = Some(ip("198.18.0.1"));
        p.dns = vec![ip("198.18.0.2"), ip("9.9.9.9")];
        p.reserved = vec![Reserved {
            first: ip("198.18.0.4"),
            last: ip("198.18.0.5"),
        }];
        let taken = |a: IpAddr| a == ip("198.18.0.3");
        assert_eq!(p.allocate(1, &taken).unwrap(), vec![ip("198.18.0.6")]);
        let e = p.allocate(2, &taken).unwrap_err();
        assert_eq!(
            e,
            PlanError::TooSmall {
                cidr: p.subnet,
                free: 1,
                wanted: 2
            }
        );
        assert!(
            e.to_string()
                .contains("has 1 usable addresses left, fewer than the 2")
        );
    }

    #[test]
    fn small_and_v6_subnets() {
        assert_eq!(
            plan("198.18.0.0/31").allocate(2, &|_| false).unwrap(),
            vec![ip("198.18.0.0"), ip("198.18.0.1")]
        );
        let v6 = plan("2001:db8::/64").allocate(2, &|_| false).unwrap();
        assert_eq!(v6, vec![ip("2001:db8::1"), ip("2001:db8::2")]);
        // A huge subnet is walked lazily.
        assert_eq!(plan("10.0.0.0/8").allocate(3, &|_| false).unwrap().len(), 3);
    }

    #[test]
    fn check_names_the_field() {
        let mut p = plan("198.18.0.0/24");
        p.gateway = Some(ip("198.19.0.1"));
        assert!(
            p.check()
                .unwrap_err()
                .to_string()
                .starts_with("field `gateway`")
        );
        p.gateway = None;
        p.reserved = vec![Reserved {
            first: ip("198.18.0.9"),
            last: ip("198.18.0.2"),
        }];
        assert!(
            p.check()
                .unwrap_err()
                .to_string()
                .contains("ends before it starts")
        );
    }
}
