//! The `cloud-init` customizer: a NoCloud seed that gives the instance its identity when
//! cloud-init runs in it. On a tree master the seed is written where cloud-init looks for a
//! local one, `/var/lib/cloud/seed/nocloud/`; on a disk master the engine moves these files
//! into the instance's `cidata` volume, adding the other customizers' file edits to the
//! user-data.
//!
//! Configuration: `interface` (the name pattern the address goes on, default `e*`),
//! `user-data` (an object merged into the `#cloud-config` document: `packages`, `runcmd`,
//! `users`, ...), `ssh-authorized-keys` (keys for the default user).

use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit};
use mint_sdk::net::ToIpAddr;
use serde_json::{Map, Value, json};

/// The customizer; see the crate documentation.
pub struct CloudInit;

/// Where cloud-init's NoCloud source reads a seed inside the instance.
pub const SEED_DIR: &str = "/var/lib/cloud/seed/nocloud";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    #[serde(default = "default_interface")]
    interface: String,
    #[serde(default)]
    user_data: Map<String, Value>,
    #[serde(default)]
    ssh_authorized_keys: Vec<String>,
}

fn default_interface() -> String {
    "e*".into()
}

fn q(s: &str) -> String {
    Value::from(s).to_string()
}

impl Customizer for CloudInit {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let s: Settings = cx.config.parse()?;
        if s.interface.is_empty()
            || s.interface.len() > 15
            || !s
                .interface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"*-_.".contains(&b))
        {
            return Err(Error::invalid_input(format!(
                "configuration key `interface`: `{}` is not an interface name pattern",
                s.interface
            )));
        }
        let i = cx.instance;
        let meta = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            q(&format!("mint-{}-{}", i.tier, i.index)),
            q(&i.hostname)
        );
        let mut net = format!(
            "version: 2\nethernets:\n  primary:\n    match:\n      name: {}\n",
            q(&s.interface)
        );
        net.push_str(&format!(
            "    addresses:\n      - {}\n",
            q(&cx.cidr().to_string())
        ));
        if let Some(gw) = &i.gateway {
            let gw = gw.to_ip();
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            net.push_str(&format!(
                "    routes:\n      - to: {}\n        via: {}\n",
                q(to),
                q(&gw.to_string())
            ));
        }
        if !i.dns.is_empty() {
            net.push_str("    nameservers:\n      addresses:\n");
            for d in &i.dns {
                net.push_str(&format!("        - {}\n", q(&d.to_ip().to_string())));
            }
        }
        let mut doc = s.user_data;
        doc.insert("hostname".into(), json!(i.hostname));
        doc.entry("preserve_hostname").or_insert(json!(false));
        if !s.ssh_authorized_keys.is_empty() {
            doc.insert("ssh_authorized_keys".into(), json!(s.ssh_authorized_keys));
        }
        let user = format!(
            "#cloud-config\n{}\n",
            serde_json::to_string_pretty(&Value::Object(doc)).expect("JSON serialises")
        );
        Ok(vec![
            Edit::write(format!("{SEED_DIR}/meta-data"), meta, 0o600),
            Edit::write(format!("{SEED_DIR}/network-config"), net, 0o600),
            Edit::write(format!("{SEED_DIR}/user-data"), user, 0o600),
        ])
    }
}

mint_sdk::export_customizer!(CloudInit);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::Config;
    use mint_sdk::testing::{Master, instance, written};

    #[test]
    fn writes_a_seed_with_the_identity_and_the_configured_user_data() {
        let cfg = Config::from_json(r#"{"user-data": {"packages": ["nginx"]}, "ssh-authorized-keys": ["ssh-ed25519 AAAA ops"]}"#).unwrap();
        let e = Master::new()
            .customize::<CloudInit>(&instance(3, "web-3", "198.18.0.13", 24), &cfg)
            .unwrap();
        assert_eq!(
            written(&e, "/var/lib/cloud/seed/nocloud/meta-data").unwrap(),
            "instance-id: \"mint-test-3\"\nlocal-hostname: \"web-3\"\n"
        );
        assert!(
            written(&e, "/var/lib/cloud/seed/nocloud/network-config")
                .unwrap()
                .contains("- \"198.18.0.13/24\"")
        );
        let user = written(&e, "/var/lib/cloud/seed/nocloud/user-data").unwrap();
        let doc: Value =
            serde_json::from_str(user.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        assert_eq!(
            (doc["hostname"].as_str(), doc["packages"][0].as_str()),
            (Some("web-3"), Some("nginx"))
        );
        assert_eq!(doc["ssh_authorized_keys"][0], "ssh-ed25519 AAAA ops");
    }

    #[test]
    fn refuses_a_bad_interface_pattern() {
        let cfg = Config::from_json(r#"{"interface": "eth0; rm -rf /"}"#).unwrap();
        assert!(
            Master::new()
                .customize::<CloudInit>(&instance(0, "a", "198.18.0.1", 24), &cfg)
                .is_err()
        );
    }
}
