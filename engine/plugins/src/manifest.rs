//! Plugin manifests: the TOML that stands beside a plugin's `.wasm` and says what it is
//! and what it may do. Capabilities are deny-by-default: a plugin gets no outbound host
//! its manifest does not request and the operator does not grant.

use crate::error::LoadError;
use crate::version::WitVersion;
use serde::Deserialize;
use std::fmt;

/// The host's ceiling on any plugin's linear memory.
pub const MAX_MEMORY_MIB: u64 = 512;
/// The host's ceiling on one call's duration.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// The three kinds of plugin, each one WIT world.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Chooses nodes (`node-policy-plugin`).
    NodePolicy,
    /// Customizes an instance's image (`customizer-plugin`).
    Customizer,
    /// Provisions an instance on a node (`driver-plugin`).
    Driver,
}

impl Kind {
    /// The WIT interface a plugin of this kind exports.
    pub fn export_interface(self) -> &'static str {
        match self {
            Kind::NodePolicy => "node-policy",
            Kind::Customizer => "customizer",
            Kind::Driver => "driver",
        }
    }
    /// The kind that exports `interface`, if any.
    pub fn from_interface(interface: &str) -> Option<Kind> {
        [Kind::NodePolicy, Kind::Customizer, Kind::Driver]
            .into_iter()
            .find(|k| k.export_interface() == interface)
    }
    /// The kind's name as manifests spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NodePolicy => "node-policy",
            Kind::Customizer => "customizer",
            Kind::Driver => "driver",
        }
    }
    fn default_timeout_ms(self) -> u64 {
        match self {
            Kind::NodePolicy | Kind::Customizer => 2_000,
            Kind::Driver => 60_000,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A parsed and checked manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The plugin's name, as tiers refer to it.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// Its kind.
    pub kind: Kind,
    /// The `mint:plugin` version it was built against.
    pub wit: WitVersion,
    /// One line for `mint plugin` listings.
    pub description: String,
    /// Who ships it; a signed package's key must belong to this vendor.
    pub vendor: Option<String>,
    /// What it may use.
    pub capabilities: Capabilities,
    /// Configuration defaults, a JSON object; a tier's settings overlay them.
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// What a plugin asks to use. Everything absent is denied.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Linear-memory ceiling per call.
    pub memory_mib: u64,
    /// Wall-clock ceiling per call.
    pub timeout_ms: u64,
    /// Outbound HTTP destinations (drivers only), as `scheme://host:port` patterns.
    pub outbound_hosts: Vec<HostPattern>,
    /// Node properties (drivers only) that hold a management endpoint URL, such as
    /// `agent-url` or `bmc-url`: during a call about a node, the driver may reach exactly
    /// the endpoints that node's properties name, and no other node's.
    pub node_endpoints: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawManifest {
    name: String,
    version: String,
    kind: String,
    wit: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    vendor: Option<String>,
    #[serde(default)]
    capabilities: RawCapabilities,
    #[serde(default)]
    config: Option<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawCapabilities {
    memory_mib: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    node_endpoints: Vec<String>,
}

impl Manifest {
    /// Parses and checks a manifest. `source` names it in errors (a path, or `bundled:spread`).
    pub fn parse(source: &str, text: &str) -> Result<Manifest, LoadError> {
        let bad = |message: String| LoadError::Manifest {
            source_name: source.to_string(),
            message,
        };
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_string()))?;
        if raw.name.is_empty()
            || !raw
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(bad(format!(
                "field `name`: `{}` must be non-empty lowercase letters, digits, `-` or `_`",
                raw.name
            )));
        }
        let kind = match raw.kind.as_str() {
            "node-policy" => Kind::NodePolicy,
            "customizer" => Kind::Customizer,
            "driver" => Kind::Driver,
            other => {
                return Err(bad(format!(
                    "field `kind`: `{other}` is not a plugin kind; use node-policy, customizer or driver"
                )));
            }
        };
        let wit = raw.wit.strip_prefix("mint:plugin@").unwrap_or(&raw.wit);
        let wit = WitVersion::parse(wit).ok_or_else(|| {
            bad(format!(
                "field `wit`: `{}` is not a version such as `0.1.0`",
                raw.wit
            ))
        })?;
        let caps = raw.capabilities;
        let memory_mib = caps.memory_mib.unwrap_or(64);
        if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
            return Err(bad(format!(
                "field `capabilities.memory-mib`: {memory_mib} is outside 1..={MAX_MEMORY_MIB}"
            )));
        }
        let timeout_ms = caps.timeout_ms.unwrap_or(kind.default_timeout_ms());
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(bad(format!(
                "field `capabilities.timeout-ms`: {timeout_ms} is outside 1..={MAX_TIMEOUT_MS}"
            )));
        }
        if kind != Kind::Driver && !caps.allowed_outbound_hosts.is_empty() {
            return Err(bad(format!(
                "field `capabilities.allowed-outbound-hosts`: only drivers may reach the network, and this plugin is a {kind}"
            )));
        }
        if kind != Kind::Driver && !caps.node_endpoints.is_empty() {
            return Err(bad(format!(
                "field `capabilities.node-endpoints`: only drivers reach nodes, and this plugin is a {kind}"
            )));
        }
        if let Some(bad_name) = caps.node_endpoints.iter().find(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }) {
            return Err(bad(format!(
                "field `capabilities.node-endpoints`: `{bad_name}` is not a node property name"
            )));
        }
        let outbound_hosts = caps
            .allowed_outbound_hosts
            .iter()
            .map(|h| {
                HostPattern::parse(h)
                    .map_err(|m| bad(format!("field `capabilities.allowed-outbound-hosts`: {m}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config = match raw.config {
            None => serde_json::Map::new(),
            Some(table) => match serde_json::to_value(table) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => return Err(bad("table `config` cannot be expressed as JSON".into())),
            },
        };
        Ok(Manifest {
            name: raw.name,
            version: raw.version,
            kind,
            wit,
            description: raw.description,
            vendor: raw.vendor,
            capabilities: Capabilities {
                memory_mib,
                timeout_ms,
                outbound_hosts,
                node_endpoints: caps.node_endpoints,
            },
            config,
        })
    }
}

/// An allowed outbound destination: `http://198.18.0.2:8080`, `https://*.bmc.example.com`,
/// `http://127.0.0.1:*`. The host part may start with `*.` for any subdomain and the port
/// may be `*`; a missing port means the scheme's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses a pattern, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("`{text}` needs a scheme, as in `http://{text}`"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("`{text}`: scheme must be http or https"));
        }
        if rest.contains('/') || rest.is_empty() {
            return Err(format!(
                "`{text}`: give only scheme, host and port, without a path"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                let port = match p {
                    "*" => None,
                    p => Some(
                        p.parse::<u16>()
                            .map_err(|_| format!("`{text}`: port `{p}` is not a number or `*`"))?,
                    ),
                };
                (h, port)
            }
            _ => (rest, Some(if scheme == "https" { 443 } else { 80 })),
        };
        if host.is_empty()
            || host.contains('*') && !(host.starts_with("*.") && !host[2..].contains('*'))
        {
            return Err(format!(
                "`{text}`: host must be a name, an address or `*.domain`"
            ));
        }
        Ok(HostPattern {
            scheme: scheme.into(),
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request to `scheme://host:port` matches.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => self.host == host,
        };
        self.scheme == scheme && host_ok && self.port.is_none_or(|p| p == port)
    }
}

impl HostPattern {
    /// The one destination a URL names (`http://198.18.1.2:7601/v1` → that scheme, host and
    /// port), for granting a node's own management endpoint.
    pub fn of_url(url: &str) -> Result<HostPattern, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("`{url}` is not a URL"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if let Some((_, host)) = authority.rsplit_once('@') {
            // Not echoed: the part before `@` is a secret.
            return Err(format!(
                "the URL for {scheme}://{host} carries credentials (`user:password@`), which do not belong in an endpoint URL; put them in the daemon's credentials file"
            ));
        }
        let p = HostPattern::parse(&format!("{scheme}://{authority}"))?;
        if p.host.contains('*') {
            return Err(format!("`{url}`: an endpoint names one host"));
        }
        Ok(p)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{p}", self.scheme, self.host),
            None => write!(f, "{}://{}:*", self.scheme, self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "spread"
        version = "1.2.0"
        kind = "node-policy"
        wit = "mint:plugin@0.1.0"
        [config]
        domains = ["zone", "rack"]
    "#;

    #[test]
    fn parses_defaults_and_config() {
        let m = Manifest::parse("t", GOOD).unwrap();
        assert_eq!(m.kind, Kind::NodePolicy);
        assert_eq!(m.capabilities.memory_mib, 64);
        assert_eq!(m.capabilities.timeout_ms, 2_000);
        assert_eq!(m.config["domains"], serde_json::json!(["zone", "rack"]));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (GOOD.replace("node-policy", "scheduler"), "field `kind`"),
            (GOOD.replace("mint:plugin@0.1.0", "latest"), "field `wit`"),
            (GOOD.replace("\"spread\"", "\"Spread!\""), "field `name`"),
            (
                format!("{GOOD}\n[capabilities]\nmemory-mib = 100000"),
                "memory-mib",
            ),
            (
                format!("{GOOD}\n[capabilities]\nallowed-outbound-hosts = [\"http://x\"]"),
                "only drivers",
            ),
            (GOOD.replace("version", "verison"), "verison"),
        ];
        for (text, needle) in cases {
            let e = Manifest::parse("t", &text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle} not in {e}");
        }
    }

    #[test]
    fn host_patterns() {
        let p = HostPattern::parse("http://127.0.0.1:8080").unwrap();
        assert!(p.matches("http", "127.0.0.1", 8080));
        assert!(!p.matches("http", "127.0.0.1", 8081));
        assert!(!p.matches("https", "127.0.0.1", 8080));
        let w = HostPattern::parse("https://*.bmc.example").unwrap();
        assert!(w.matches("https", "r1.bmc.example", 443));
        assert!(!w.matches("https", "bmc.example", 443));
        assert!(!w.matches("https", "evilbmc.example", 443));
        assert!(
            HostPattern::parse("http://127.0.0.1:*")
                .unwrap()
                .matches("http", "127.0.0.1", 1)
        );
        assert!(HostPattern::parse("127.0.0.1").is_err());
        assert!(HostPattern::parse("http://a/b").is_err());
        assert!(HostPattern::parse("http://a*b").is_err());
    }
}
