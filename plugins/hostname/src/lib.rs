//! The `hostname` customizer: gives an instance its pre-assigned host name.
//!
//! Writes `/etc/hostname`, and in `/etc/hosts` maps the name (and the fully qualified
//! name, when `domain` is configured) to the instance's address, replacing the
//! distribution's `127.0.1.1` line if the master has one.

#[cfg(test)]
use mint_sdk::Config;
use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit};

/// The customizer; see the crate documentation.
pub struct Hostname;

/// The step's configuration.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// DNS domain appended for the fully qualified name.
    domain: Option<String>,
}

fn valid_hostname(name: &str) -> bool {
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

impl Customizer for Hostname {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let settings: Settings = cx.config.parse()?;
        let name = &cx.instance.hostname;
        if !valid_hostname(name) {
            return Err(Error::invalid_input(format!(
                "host name `{name}` is not a valid DNS name"
            )));
        }
        let names = match &settings.domain {
            Some(d) if !valid_hostname(d) => {
                return Err(Error::invalid_input(format!(
                    "configuration key `domain`: `{d}` is not a valid DNS name"
                )));
            }
            Some(d) => format!("{name}.{d} {name}"),
            None => name.clone(),
        };
        let mut edits = vec![Edit::write("/etc/hostname", format!("{name}\n"), 0o644)];

        let own = format!("{}\t{names}", cx.cidr().addr);
        let hosts = match cx.read_to_string("/etc/hosts")? {
            Some(text) => {
                let mut lines: Vec<String> = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("127.0.1.1"))
                    .map(str::to_string)
                    .collect();
                lines.push(own);
                lines.join("\n") + "\n"
            }
            None => {
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{own}\n")
            }
        };
        edits.push(Edit::write("/etc/hosts", hosts, 0o644));
        Ok(edits)
    }
}

mint_sdk::export_customizer!(Hostname);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::testing::{Master, instance, written};

    #[test]
    fn writes_hostname_and_replaces_debian_hosts_line() {
        let m = Master::new().file("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n");
        let cfg = Config::from_json(r#"{"domain": "example.test"}"#).unwrap();
        let e = m
            .customize::<Hostname>(&instance(4, "web-004", "198.18.0.5", 24), &cfg)
            .unwrap();
        assert_eq!(written(&e, "/etc/hostname").unwrap(), "web-004\n");
        let hosts = written(&e, "/etc/hosts").unwrap();
        assert_eq!(
            hosts,
            "127.0.0.1\tlocalhost\n198.18.0.5\tweb-004.example.test web-004\n"
        );
    }

    #[test]
    fn refuses_bad_names_and_unknown_keys() {
        let m = Master::new();
        assert!(
            m.customize::<Hostname>(&instance(0, "bad_name", "198.18.0.1", 24), &Config::new())
                .is_err()
        );
        let typo = Config::from_json(r#"{"domian": "x"}"#).unwrap();
        let e = m
            .customize::<Hostname>(&instance(0, "ok", "198.18.0.1", 24), &typo)
            .unwrap_err();
        assert!(e.message.contains("domian"), "{}", e.message);
    }
}
