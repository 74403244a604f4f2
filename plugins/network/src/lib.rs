//! The `network` customizer: renders the instance's pre-assigned address, gateway and DNS
//! in the network-configuration format the master already uses.
//!
//! The format is detected from the master's files: netplan (`/etc/netplan/*.yaml`),
//! ifupdown (`/etc/network/interfaces` with an `ifup` binary) or systemd-networkd (its
//! service unit). Configuration: `format` (`auto`, `netplan`, `networkd`, `ifupdown`),
//! `interface` (default `eth0`), `mtu`, and `replace-existing` (default true: remove the
//! master's other configuration files of that format, which would otherwise fight over
//! the interface, for example with DHCP).

#[cfg(test)]
use mint_sdk::Config;
use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit, FileKind};
use mint_sdk::net::ToIpAddr;
use std::fmt::Write as _;
use std::net::IpAddr;

/// The customizer; see the crate documentation.
pub struct Network;

/// A network-configuration format a master may use.
#[derive(serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Detect from the master's files.
    #[default]
    Auto,
    /// `/etc/netplan/*.yaml`.
    Netplan,
    /// `/etc/systemd/network/*.network`.
    Networkd,
    /// `/etc/network/interfaces`.
    Ifupdown,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    #[serde(default)]
    format: Format,
    #[serde(default = "default_interface")]
    interface: String,
    mtu: Option<u32>,
    #[serde(default = "yes")]
    replace_existing: bool,
}

fn default_interface() -> String {
    "eth0".into()
}
fn yes() -> bool {
    true
}

const NETPLAN_FILE: &str = "/etc/netplan/50-mint.yaml";
const NETWORKD_FILE: &str = "/etc/systemd/network/10-mint.network";
const IFUPDOWN_FILE: &str = "/etc/network/interfaces";

/// Detects the format a master uses, or says what was looked for.
pub fn detect(cx: &Context<'_>) -> Result<Format, Error> {
    let has_yaml = cx.list_dir("/etc/netplan")?.is_some_and(|entries| {
        entries
            .iter()
            .any(|e| e.name.ends_with(".yaml") || e.name.ends_with(".yml"))
    });
    if has_yaml {
        return Ok(Format::Netplan);
    }
    let any = |paths: &[&str]| -> Result<bool, Error> {
        for p in paths {
            if cx.exists(p)? {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let interfaces = cx
        .stat(IFUPDOWN_FILE)?
        .is_some_and(|s| s.kind == FileKind::File);
    if interfaces && any(&["/sbin/ifup", "/usr/sbin/ifup"])? {
        return Ok(Format::Ifupdown);
    }
    if any(&[
        "/usr/lib/systemd/system/systemd-networkd.service",
        "/lib/systemd/system/systemd-networkd.service",
    ])? {
        return Ok(Format::Networkd);
    }
    if cx.exists("/etc/netplan")? {
        return Ok(Format::Netplan);
    }
    if interfaces {
        return Ok(Format::Ifupdown);
    }
    Err(Error::invalid_input(
        "cannot tell the master's network configuration format: it has no /etc/netplan/*.yaml, \
         no /etc/network/interfaces and no systemd-networkd unit; set `format` in the step's configuration",
    ))
}

fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Customizer for Network {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let s: Settings = cx.config.parse()?;
        if !valid_interface(&s.interface) {
            return Err(Error::invalid_input(format!(
                "configuration key `interface`: `{}` is not an interface name (1-15 letters, digits, `-`, `_`, `.`)",
                s.interface
            )));
        }
        let format = if s.format == Format::Auto {
            detect(cx)?
        } else {
            s.format
        };
        let i = cx.instance;
        let cidr = cx.cidr();
        let gateway = i.gateway.as_ref().map(|g| g.to_ip());
        let dns: Vec<IpAddr> = i.dns.iter().map(|d| d.to_ip()).collect();
        let banner = format!(
            "# Written by mint for {} (tier {}, instance {}).\n",
            i.hostname, i.tier, i.index
        );

        let mut edits = Vec::new();
        let (path, text, dir, suffixes): (&str, String, &str, &[&str]) = match format {
            Format::Netplan => (
                NETPLAN_FILE,
                netplan(&banner, &s, &cidr.to_string(), gateway, &dns),
                "/etc/netplan",
                &[".yaml", ".yml"],
            ),
            Format::Networkd => (
                NETWORKD_FILE,
                networkd(&banner, &s, &cidr.to_string(), gateway, &dns),
                "/etc/systemd/network",
                &[".network"],
            ),
            Format::Ifupdown => (
                IFUPDOWN_FILE,
                ifupdown(&banner, &s, cidr.addr, &cidr.to_string(), gateway, &dns),
                "",
                &[],
            ),
            Format::Auto => unreachable!("detect never answers auto"),
        };
        if s.replace_existing && !dir.is_empty() {
            for e in cx.list_dir(dir)?.unwrap_or_default() {
                let p = format!("{dir}/{}", e.name);
                if p != path && suffixes.iter().any(|x| e.name.ends_with(x)) {
                    edits.push(Edit::remove(p));
                }
            }
        }
        if format == Format::Netplan && !cx.exists("/etc/netplan")? {
            edits.push(Edit::make_dir("/etc/netplan", 0o755));
        }
        // netplan refuses configuration files that others can read.
        let mode = if format == Format::Netplan {
            0o600
        } else {
            0o644
        };
        edits.push(Edit::write(path, text, mode));
        Ok(edits)
    }
}

fn netplan(banner: &str, s: &Settings, cidr: &str, gw: Option<IpAddr>, dns: &[IpAddr]) -> String {
    let mut t = format!(
        "{banner}network:\n  version: 2\n  ethernets:\n    {}:\n",
        s.interface
    );
    t += "      dhcp4: false\n      dhcp6: false\n";
    let _ = writeln!(t, "      addresses: [\"{cidr}\"]");
    if let Some(mtu) = s.mtu {
        let _ = writeln!(t, "      mtu: {mtu}");
    }
    if let Some(gw) = gw {
        let _ = writeln!(
            t,
            "      routes:\n        - to: default\n          via: {gw}"
        );
    }
    if !dns.is_empty() {
        let list: Vec<String> = dns.iter().map(|d| format!("\"{d}\"")).collect();
        let _ = writeln!(
            t,
            "      nameservers:\n        addresses: [{}]",
            list.join(", ")
        );
    }
    t
}

fn networkd(banner: &str, s: &Settings, cidr: &str, gw: Option<IpAddr>, dns: &[IpAddr]) -> String {
    let mut t = format!(
        "{banner}[Match]\nName={}\n\n[Network]\nAddress={cidr}\n",
        s.interface
    );
    if let Some(gw) = gw {
        let _ = writeln!(t, "Gateway={gw}");
    }
    for d in dns {
        let _ = writeln!(t, "DNS={d}");
    }
    if let Some(mtu) = s.mtu {
        let _ = write!(t, "\n[Link]\nMTUBytes={mtu}\n");
    }
    t
}

fn ifupdown(
    banner: &str,
    s: &Settings,
    addr: IpAddr,
    cidr: &str,
    gw: Option<IpAddr>,
    dns: &[IpAddr],
) -> String {
    let family = if addr.is_ipv4() { "inet" } else { "inet6" };
    let ifc = &s.interface;
    let mut t = format!(
        "{banner}source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nauto {ifc}\niface {ifc} {family} static\n    address {cidr}\n"
    );
    if let Some(gw) = gw {
        let _ = writeln!(t, "    gateway {gw}");
    }
    if !dns.is_empty() {
        let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(t, "    dns-nameservers {}", list.join(" "));
    }
    if let Some(mtu) = s.mtu {
        let _ = writeln!(t, "    mtu {mtu}");
    }
    t
}

mint_sdk::export_customizer!(Network);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::customizer::Instance;
    use mint_sdk::testing::{Master, instance, written};

    fn web4() -> Instance {
        let mut i = instance(4, "web-004", "198.18.0.5", 24);
        i.gateway = Some("198.18.0.1".parse::<IpAddr>().unwrap().into());
        i.dns = vec!["198.18.0.53".parse::<IpAddr>().unwrap().into()];
        i
    }

    #[test]
    fn netplan_master_gets_netplan_and_loses_its_dhcp_file() {
        let m = Master::new().file(
            "/etc/netplan/50-cloud-init.yaml",
            "network: {ethernets: {eth0: {dhcp4: true}}}",
        );
        let e = m.customize::<Network>(&web4(), &Config::new()).unwrap();
        assert_eq!(e[0], Edit::remove("/etc/netplan/50-cloud-init.yaml"));
        let y = written(&e, NETPLAN_FILE).unwrap();
        assert!(
            y.contains("addresses: [\"198.18.0.5/24\"]") && y.contains("via: 198.18.0.1"),
            "{y}"
        );
        assert!(y.contains("addresses: [\"198.18.0.53\"]"), "{y}");
    }

    #[test]
    fn debian_ifupdown_master_gets_interfaces() {
        let m = Master::new()
            .file(
                "/etc/network/interfaces",
                "auto eth0\niface eth0 inet dhcp\n",
            )
            .file("/sbin/ifup", "")
            .dir("/etc/systemd/network")
            .file("/lib/systemd/system/systemd-networkd.service", "");
        let e = m.customize::<Network>(&web4(), &Config::new()).unwrap();
        let t = written(&e, IFUPDOWN_FILE).unwrap();
        assert!(
            t.contains(
                "iface eth0 inet static\n    address 198.18.0.5/24\n    gateway 198.18.0.1\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn networkd_master_with_ipv6_and_explicit_interface() {
        let m = Master::new()
            .file("/usr/lib/systemd/system/systemd-networkd.service", "")
            .file("/etc/systemd/network/99-dhcp.network", "");
        let cfg = Config::from_json(r#"{"interface": "ens3", "mtu": 9000}"#).unwrap();
        let e = m
            .customize::<Network>(&instance(1, "db-001", "2001:db8::10", 64), &cfg)
            .unwrap();
        assert_eq!(e[0], Edit::remove("/etc/systemd/network/99-dhcp.network"));
        let t = written(&e, NETWORKD_FILE).unwrap();
        assert!(
            t.contains("Name=ens3\n")
                && t.contains("Address=2001:db8::10/64\n")
                && t.contains("MTUBytes=9000"),
            "{t}"
        );
    }

    #[test]
    fn unknown_master_and_bad_settings_are_clear_errors() {
        let e = Master::new()
            .customize::<Network>(&web4(), &Config::new())
            .unwrap_err();
        assert!(e.message.contains("set `format`"), "{}", e.message);
        let bad = Config::from_json(r#"{"format": "wicked"}"#).unwrap();
        assert!(
            Master::new()
                .customize::<Network>(&web4(), &bad)
                .unwrap_err()
                .message
                .contains("wicked")
        );
        let bad =
            Config::from_json(r#"{"format": "netplan", "interface": "eth0; rm -rf /"}"#).unwrap();
        assert!(
            Master::new()
                .customize::<Network>(&web4(), &bad)
                .unwrap_err()
                .message
                .contains("`interface`")
        );
    }
}
