//! The `files` customizer: writes files from templates in its configuration, filled with
//! the instance's identity, so site-specific configuration needs no plugin of its own.
//!
//! Configuration: `files`, a list of `{ path, template, mode = "0644", uid = 0, gid = 0 }`.
//! A template may use `{tier}`, `{index}`, `{hostname}`, `{address}`, `{prefix}`,
//! `{cidr}`, `{gateway}`, `{dns}` (space-separated) and `{peers}` (K); `{{` and `}}` are
//! literal braces. An unknown placeholder is refused, naming the file and the placeholder.

use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit, FileMeta, WriteFile};
use mint_sdk::net::ToIpAddr;

/// The customizer; see the crate documentation.
pub struct Files;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    files: Vec<FileSpec>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    path: String,
    template: String,
    #[serde(default = "default_mode")]
    mode: String,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
}

fn default_mode() -> String {
    "0644".into()
}

/// Fills `template`; `lookup` answers a placeholder's value or none when it is unknown.
fn fill(template: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if let Some(t) = tail.strip_prefix('{') {
            let end = t
                .find('}')
                .ok_or("a `{` is not closed (write `{{` for a literal brace)")?;
            let name = &t[..end];
            out.push_str(&lookup(name).ok_or_else(|| format!("unknown placeholder `{{{name}}}`"))?);
            rest = &t[end + 1..];
        } else {
            return Err("a lone `}` (write `}}` for a literal brace)".into());
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl Customizer for Files {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let s: Settings = cx.config.parse()?;
        let i = cx.instance;
        let lookup = |name: &str| -> Option<String> {
            Some(match name {
                "tier" => i.tier.clone(),
                "index" => i.index.to_string(),
                "hostname" => i.hostname.clone(),
                "address" => i.address.to_ip().to_string(),
                "prefix" => i.prefix_len.to_string(),
                "cidr" => cx.cidr().to_string(),
                "gateway" => i
                    .gateway
                    .as_ref()
                    .map(|g| g.to_ip().to_string())
                    .unwrap_or_default(),
                "dns" => i
                    .dns
                    .iter()
                    .map(|d| d.to_ip().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                "peers" => i.peer_count.to_string(),
                _ => return None,
            })
        };
        let mut edits = Vec::new();
        for (n, f) in s.files.iter().enumerate() {
            let at = |why: String| {
                Error::invalid_input(format!(
                    "configuration key `files[{n}]` ({}): {why}",
                    f.path
                ))
            };
            if !f.path.starts_with('/') {
                return Err(at("`path` must be absolute".into()));
            }
            let mode = u32::from_str_radix(f.mode.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    at(format!(
                        "`mode` `{}` is not an octal mode such as \"0644\"",
                        f.mode
                    ))
                })?;
            let text = fill(&f.template, &lookup).map_err(at)?;
            edits.push(Edit::WriteFile(WriteFile {
                path: f.path.clone(),
                contents: text.into_bytes(),
                meta: FileMeta {
                    mode,
                    uid: f.uid,
                    gid: f.gid,
                },
            }));
        }
        Ok(edits)
    }
}

mint_sdk::export_customizer!(Files);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::Config;
    use mint_sdk::testing::{Master, instance, written};

    #[test]
    fn fills_templates_with_the_identity() {
        let cfg = Config::from_json(
            r#"{"files": [{"path": "/etc/motd", "template": "{hostname} ({address}/{prefix}) is {index} of {peers} in {tier} {{ok}}\n"},
                           {"path": "/etc/app.env", "template": "CIDR={cidr}\n", "mode": "0600"}]}"#,
        )
        .unwrap();
        let e = Master::new()
            .customize::<Files>(&instance(2, "web-2", "198.18.0.12", 24), &cfg)
            .unwrap();
        assert_eq!(
            written(&e, "/etc/motd").unwrap(),
            "web-2 (198.18.0.12/24) is 2 of 3 in test {ok}\n"
        );
        assert_eq!(
            written(&e, "/etc/app.env").unwrap(),
            "CIDR=198.18.0.12/24\n"
        );
        assert!(matches!(&e[1], Edit::WriteFile(w) if w.meta.mode == 0o600));
    }

    #[test]
    fn refuses_unknown_placeholders_and_bad_modes() {
        for (cfg, needle) in [
            (
                r#"{"files": [{"path": "/x", "template": "{hostnmae}"}]}"#,
                "unknown placeholder `{hostnmae}`",
            ),
            (
                r#"{"files": [{"path": "/x", "template": "{open"}]}"#,
                "not closed",
            ),
            (
                r#"{"files": [{"path": "/x", "template": "a", "mode": "rw"}]}"#,
                "not an octal mode",
            ),
            (
                r#"{"files": [{"path": "x", "template": "a"}]}"#,
                "must be absolute",
            ),
        ] {
            let e = Master::new()
                .customize::<Files>(
                    &instance(0, "a", "198.18.0.1", 24),
                    &Config::from_json(cfg).unwrap(),
                )
                .unwrap_err();
            assert!(e.message.contains(needle), "{needle} not in {}", e.message);
        }
    }
}
