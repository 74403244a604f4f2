//! Typed helpers for addresses: converting the WIT address form to and from
//! `std::net`, and prefix arithmetic that renderers of network configuration need.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address with its prefix length, as `198.18.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length in bits.
    pub prefix_len: u8,
}

impl Cidr {
    /// The netmask of an IPv4 prefix (`255.255.255.0` for /24); none for IPv6.
    pub fn netmask_v4(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(_) if self.prefix_len <= 32 => {
                let bits = if self.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix_len)
                };
                Some(Ipv4Addr::from(bits))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Converts the WIT form of an address to `std::net` (implemented per world, since each
/// world has its own generated type).
pub trait ToIpAddr {
    /// The address as `std::net::IpAddr`.
    fn to_ip(&self) -> IpAddr;
}

/// Implements [`ToIpAddr`] and `From<IpAddr>` for a world's generated `ip-address`.
#[allow(unused_macros)]
macro_rules! impl_ip_conversions {
    ($ty:path) => {
        impl $crate::net::ToIpAddr for $ty {
            fn to_ip(&self) -> std::net::IpAddr {
                use $ty as T;
                match *self {
                    T::Ipv4((a, b, c, d)) => std::net::Ipv4Addr::new(a, b, c, d).into(),
                    T::Ipv6((a, b, c, d, e, f, g, h)) => {
                        std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h).into()
                    }
                }
            }
        }
        impl From<std::net::IpAddr> for $ty {
            fn from(ip: std::net::IpAddr) -> Self {
                match ip {
                    std::net::IpAddr::V4(v4) => {
                        let [a, b, c, d] = v4.octets();
                        Self::Ipv4((a, b, c, d))
                    }
                    std::net::IpAddr::V6(v6) => {
                        let [a, b, c, d, e, f, g, h] = v6.segments();
                        Self::Ipv6((a, b, c, d, e, f, g, h))
                    }
                }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use impl_ip_conversions;

/// Parses an address, for tests and configuration: `"198.18.0.5".parse()` works too, this
/// only saves the type annotation.
pub fn ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

/// The unspecified IPv6 address, handy as a default.
pub const V6_UNSPECIFIED: Ipv6Addr = Ipv6Addr::UNSPECIFIED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_of_common_prefixes() {
        let c = |p| Cidr {
            addr: "198.18.0.5".parse().unwrap(),
            prefix_len: p,
        };
        assert_eq!(c(24).netmask_v4(), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(c(15).netmask_v4(), Some(Ipv4Addr::new(255, 254, 0, 0)));
        assert_eq!(c(0).netmask_v4(), Some(Ipv4Addr::new(0, 0, 0, 0)));
        assert_eq!(c(32).netmask_v4(), Some(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(c(33).netmask_v4(), None);
        assert_eq!(
            Cidr {
                addr: "2001:db8::1".parse().unwrap(),
                prefix_len: 64
            }
            .to_string(),
            "2001:db8::1/64"
        );
    }
}
