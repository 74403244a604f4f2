//! Credentials the operator keeps for nodes' management endpoints (BMCs), read from a
//! secrets file, and the `Authorization` value the host adds to a driver's requests to
//! exactly the endpoint they belong to. Plugins never see them; nothing here prints them.

use crate::manifest::HostPattern;
use base64::Engine as _;
use serde::Deserialize;
use std::fmt;

/// An `Authorization` header value. Its `Debug` and `Display` never show the secret.
#[derive(Clone)]
pub struct Authorization(http::HeaderValue);

impl Authorization {
    /// HTTP basic authentication for `username` and `password`.
    pub fn basic(username: &str, password: &str) -> Result<Authorization, String> {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        let mut v = http::HeaderValue::from_str(&format!("Basic {token}"))
            .map_err(|_| "not a header value".to_string())?;
        v.set_sensitive(true);
        Ok(Authorization(v))
    }

    /// A bearer token.
    pub fn bearer(token: &str) -> Result<Authorization, String> {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "not a header value".to_string())?;
        v.set_sensitive(true);
        Ok(Authorization(v))
    }

    pub(crate) fn header_value(&self) -> http::HeaderValue {
        self.0.clone()
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authorization(<redacted>)")
    }
}

/// Which requests one entry's credentials (or TLS trust) go with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scope {
    /// Requests about this node, to the endpoint its properties name.
    Node(String),
    /// Requests to this endpoint, about any node.
    Endpoint(HostPattern),
    /// Any node endpoint no other entry covers.
    Default,
}

#[derive(Debug, Clone)]
struct Entry {
    scope: Scope,
    username: String,
    authorization: Authorization,
}

/// Credentials the engine itself holds for a node's endpoint (what it presents to the
/// node's agent), found per call from the node's name and the property naming the
/// endpoint (`agent-url`).
pub type EngineSecrets = std::sync::Arc<dyn Fn(&str, &str) -> Option<Authorization> + Send + Sync>;

/// [`EngineSecrets`], if any, printable without showing anything.
#[derive(Clone, Default)]
struct Resolver(Option<EngineSecrets>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "EngineSecrets(<redacted>)"
        } else {
            "EngineSecrets(none)"
        })
    }
}

/// The operator's credentials for node endpoints, and the engine's own. Lookup prefers an
/// entry for the node, then one for the endpoint, then the default.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    entries: Vec<Entry>,
    engine: Resolver,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    credential: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    node: Option<String>,
    endpoint: Option<String>,
    username: String,
    password: String,
}

impl Credentials {
    /// Parses a secrets file:
    ///
    /// ```toml
    /// [[credential]]
    /// endpoint = "https://10.1.0.17"   # or: node = "rack1-n03"; neither: the default
    /// username = "admin"
    /// password = "..."
    /// ```
    ///
    /// Errors name the file, the entry and the field, never a password.
    pub fn parse(source: &str, text: &str) -> Result<Credentials, String> {
        // toml's full error quotes the offending line, which may hold a password: keep its
        // message and say where, without the line.
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            format!(
                "{source}{}: {}; each `[[credential]]` takes `username`, `password` and at most one of `node` or `endpoint`",
                at.map(|l| format!(" near line {l}")).unwrap_or_default(),
                e.message().trim_end()
            )
        })?;
        let mut entries = Vec::new();
        for (i, r) in raw.credential.into_iter().enumerate() {
            let here = format!("{source}: credential #{}", i + 1);
            let scope = match (r.node, r.endpoint) {
                (Some(_), Some(_)) => {
                    return Err(format!("{here}: give `node` or `endpoint`, not both"));
                }
                (Some(n), None) if n.is_empty() => {
                    return Err(format!("{here}: field `node` is empty"));
                }
                (Some(n), None) => Scope::Node(n),
                (None, Some(e)) => Scope::Endpoint(
                    HostPattern::of_url(&e)
                        .map_err(|m| format!("{here}: field `endpoint`: {m}"))?,
                ),
                (None, None) => Scope::Default,
            };
            if r.username.is_empty() || r.username.contains(':') {
                return Err(format!(
                    "{here}: field `username` must be non-empty and without `:`"
                ));
            }
            if entries.iter().any(|e: &Entry| e.scope == scope) {
                return Err(format!(
                    "{here}: another entry already covers the same {}",
                    describe(&scope)
                ));
            }
            let authorization = Authorization::basic(&r.username, &r.password)
                .map_err(|m| format!("{here}: field `password`: {m}"))?;
            entries.push(Entry {
                scope,
                username: r.username,
                authorization,
            });
        }
        Ok(Credentials {
            entries,
            engine: Resolver::default(),
        })
    }

    /// Keeps the engine's own secrets from `earlier` (which a reloaded secrets file knows
    /// nothing of).
    pub fn keeping_engine_secrets(mut self, earlier: &Credentials) -> Credentials {
        self.engine = earlier.engine.clone();
        self
    }

    /// Sets how the engine's own secrets for node endpoints are found.
    pub fn with_engine_secrets(mut self, secrets: EngineSecrets) -> Credentials {
        self.engine = Resolver(Some(secrets));
        self
    }

    /// The engine's own credential for node `node`'s endpoint named by `property`, if it
    /// holds one.
    pub fn engine_secret(&self, node: &str, property: &str) -> Option<Authorization> {
        self.engine.0.as_ref().and_then(|f| f(node, property))
    }

    /// Reads and parses a secrets file.
    pub fn read(path: &std::path::Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
        Credentials::parse(&path.display().to_string(), &text)
    }

    /// The credentials for requests about `node` to `endpoint`.
    pub fn lookup(&self, node: &str, endpoint: &HostPattern) -> Option<&Authorization> {
        let find = |want: &dyn Fn(&Scope) -> bool| {
            self.entries
                .iter()
                .find(|e| want(&e.scope))
                .map(|e| &e.authorization)
        };
        find(&|s| matches!(s, Scope::Node(n) if n == node))
            .or_else(|| find(&|s| matches!(s, Scope::Endpoint(p) if p == endpoint)))
            .or_else(|| find(&|s| *s == Scope::Default))
    }

    /// What the file covers, for the daemon's log: scopes and user names, no passwords.
    pub fn summary(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| format!("{} as `{}`", describe(&e.scope), e.username))
            .collect()
    }

    /// Whether the file holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub(crate) fn describe(s: &Scope) -> String {
    match s {
        Scope::Node(n) => format!("node `{n}`"),
        Scope::Endpoint(p) => format!("endpoint {p}"),
        Scope::Default => "default".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_node_then_endpoint_then_default() {
        let c = Credentials::parse(
            "t",
            r#"
            [[credential]]
            username = "dflt"
            password = "d"
            [[credential]]
            endpoint = "http://127.0.0.1:8001/redfish/v1/Systems/a"
            username = "ep"
            password = "e"
            [[credential]]
            node = "n1"
            username = "node"
            password = "n"
            "#,
        )
        .unwrap();
        let ep = HostPattern::of_url("http://127.0.0.1:8001").unwrap();
        let other = HostPattern::of_url("http://127.0.0.1:8002").unwrap();
        let b = |u: &str, p: &str| Authorization::basic(u, p).unwrap().header_value();
        assert_eq!(c.lookup("n1", &ep).unwrap().header_value(), b("node", "n"));
        assert_eq!(c.lookup("n2", &ep).unwrap().header_value(), b("ep", "e"));
        assert_eq!(
            c.lookup("n2", &other).unwrap().header_value(),
            b("dflt", "d")
        );
        assert!(Credentials::default().lookup("n1", &ep).is_none());
    }

    #[test]
    fn errors_never_show_passwords() {
        let cases = [
            (
                "[[credential]]\nusername = \"a\"\npassword = \"hunter2\"\nnode = \"x\"\nendpoint = \"http://h\"\n",
                "not both",
            ),
            (
                "[[credential]]\nusername = \"a\"\npasword = \"hunter2\"\n",
                "near line",
            ),
            (
                "[[credential]]\nusername = \"\"\npassword = \"hunter2\"\n",
                "`username`",
            ),
            (
                "[[credential]]\nendpoint = \"http://u:hunter2@h\"\nusername = \"a\"\npassword = \"hunter2\"\n",
                "`endpoint`",
            ),
            (
                "[[credential]]\nusername = \"a\"\npassword = \"hunter2\"\n[[credential]]\nusername = \"b\"\npassword = \"hunter2\"\n",
                "default",
            ),
        ];
        for (text, needle) in cases {
            let e = Credentials::parse("secrets.toml", text).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("secrets.toml"),
                "{needle}: {e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
        }
        let c = Credentials::parse(
            "t",
            "[[credential]]\nusername = \"a\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.summary(), vec!["default as `a`"]);
    }
}
