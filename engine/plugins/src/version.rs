//! The `mint:plugin` WIT version this engine speaks, and the compatibility rule.

use std::fmt;

/// A `major.minor.patch` version of the `mint:plugin` package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WitVersion {
    /// Breaking changes from 1.0 on.
    pub major: u64,
    /// Breaking changes while the major is 0; additions after.
    pub minor: u64,
    /// Fixes of documentation and contracts that change no type.
    pub patch: u64,
}

/// The version of `wit/mint.wit` this engine was built with.
pub const HOST_WIT: WitVersion = WitVersion {
    major: 0,
    minor: 1,
    patch: 2,
};

impl WitVersion {
    /// Parses `0.1.0`.
    pub fn parse(text: &str) -> Option<WitVersion> {
        let mut parts = text.split('.').map(|p| p.parse::<u64>().ok());
        let v = WitVersion {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next()??,
        };
        parts.next().is_none().then_some(v)
    }

    /// Whether a plugin built against `self` loads in a host that speaks `host`: the same
    /// major and, while the major is 0, the same minor (Cargo's reading of semver). From
    /// 1.0 on a plugin built for an older minor loads in a newer host, since minors only
    /// add.
    pub fn compatible_with(self, host: WitVersion) -> bool {
        if self.major != host.major {
            false
        } else if self.major == 0 {
            self.minor == host.minor
        } else {
            self.minor <= host.minor
        }
    }
}

impl fmt::Display for WitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_follows_cargo_semver() {
        let v = |s| WitVersion::parse(s).unwrap();
        assert!(v("0.1.0").compatible_with(v("0.1.3")));
        assert!(v("0.1.7").compatible_with(v("0.1.0")));
        assert!(!v("0.2.0").compatible_with(v("0.1.0")));
        assert!(!v("1.0.0").compatible_with(v("0.1.0")));
        assert!(v("1.1.0").compatible_with(v("1.2.0")));
        assert!(!v("1.3.0").compatible_with(v("1.2.0")));
        assert_eq!(WitVersion::parse("0.1"), None);
        assert_eq!(WitVersion::parse("0.1.0.0"), None);
    }
}
