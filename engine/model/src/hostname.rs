//! Host-name patterns such as `web-{index:03}`: how a tier names its instances.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a host-name pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `hostname`: {0}")]
pub struct PatternError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Index { width: usize },
    Tier,
}

/// A parsed pattern. Placeholders: `{index}`, `{index:0N}` (zero-padded to N digits) and
/// `{tier}`. Every rendered name must be a valid DNS label sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostnamePattern {
    source: String,
    parts: Vec<Part>,
}

impl HostnamePattern {
    /// Parses a pattern; it must contain `{index}` so that names are unique.
    pub fn parse(source: &str) -> Result<HostnamePattern, PatternError> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut has_index = false;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(PatternError(format!(
                    "`{source}` has a `}}` without its `{{`"
                )));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| PatternError(format!("`{source}` has an unclosed `{{`")))?
                + open;
            let field = &rest[open + 1..close];
            parts.push(match field {
                "index" => {
                    has_index = true;
                    Part::Index { width: 0 }
                }
                "tier" => Part::Tier,
                f if f.starts_with("index:0") => {
                    let width: usize = f[7..].parse().ok().filter(|w| (1..=10).contains(w)).ok_or_else(|| {
                        PatternError(format!("`{{{f}}}` in `{source}`: the width must be 1 to 10, as in {{index:03}}"))
                    })?;
                    has_index = true;
                    Part::Index { width }
                }
                other => {
                    return Err(PatternError(format!(
                        "`{{{other}}}` in `{source}` is not a placeholder; use {{index}}, {{index:03}} or {{tier}}"
                    )));
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(PatternError(format!(
                "`{source}` has a `}}` without its `{{`"
            )));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if !has_index {
            return Err(PatternError(format!(
                "`{source}` has no {{index}}, so every instance would get the same name"
            )));
        }
        let p = HostnamePattern {
            source: source.to_string(),
            parts,
        };
        // Names of the tier `t` at index 0 show whether the literal parts are valid.
        if !valid_dns_name(&p.render("t", 0)) {
            return Err(PatternError(format!(
                "`{source}` renders `{}`, not a valid host name (letters, digits and `-` in dot-separated labels of 1-63)",
                p.render("t", 0)
            )));
        }
        Ok(p)
    }

    /// The name of instance `index` of tier `tier`.
    pub fn render(&self, tier: &str, index: u64) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Index { width } => out.push_str(&format!("{index:0width$}")),
                Part::Tier => out.push_str(tier),
            }
        }
        out
    }

    /// Renders and checks a name: a tier name can make a pattern invalid.
    pub fn name(&self, tier: &str, index: u64) -> Result<String, PatternError> {
        let n = self.render(tier, index);
        if valid_dns_name(&n) {
            Ok(n)
        } else {
            Err(PatternError(format!(
                "`{}` renders `{n}`, not a valid host name",
                self.source
            )))
        }
    }
}

/// Whether `name` is a valid host name: dot-separated labels of 1 to 63 letters, digits
/// and inner hyphens, at most 253 characters.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl TryFrom<String> for HostnamePattern {
    type Error = PatternError;
    fn try_from(s: String) -> Result<Self, PatternError> {
        Self::parse(&s)
    }
}

impl From<HostnamePattern> for String {
    fn from(p: HostnamePattern) -> String {
        p.source
    }
}

impl fmt::Display for HostnamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_padded_and_plain() {
        let p = HostnamePattern::parse("web-{index:03}").unwrap();
        assert_eq!(p.render("web", 7), "web-007");
        assert_eq!(p.render("web", 1234), "web-1234");
        assert_eq!(
            HostnamePattern::parse("{tier}{index}.dc1")
                .unwrap()
                .render("db", 2),
            "db2.dc1"
        );
    }

    #[test]
    fn refuses_with_the_fix() {
        for (p, needle) in [
            ("web", "no {index}"),
            ("web-{idx}", "not a placeholder"),
            ("web-{index", "unclosed"),
            ("web-{index:0}", "width must be 1 to 10"),
            ("web_{index}", "not a valid host name"),
            ("-{index}", "not a valid host name"),
            ("web}-{index}", "without its"),
        ] {
            let e = HostnamePattern::parse(p).unwrap_err().to_string();
            assert!(
                e.starts_with("field `hostname`") && e.contains(needle),
                "{p}: {e}"
            );
        }
        let p = HostnamePattern::parse("{tier}-{index}").unwrap();
        assert!(p.name("bad_tier", 1).is_err());
    }
}
