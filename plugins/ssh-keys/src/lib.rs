//! The `ssh-keys` customizer: installs SSH public keys as a user's `authorized_keys`.
//!
//! Configuration: `keys` (OpenSSH public key lines, at least one), `user` (default
//! `root`). The user's uid, gid and home come from the master's `/etc/passwd`; for a master
//! whose files cannot be read (a disk image) give `uid`, `gid` and `home` instead. Each key
//! is checked to be one line of a known key type and base64 data, so a configuration
//! mistake is refused rather than locking the operator out.

use mint_sdk::Error;
use mint_sdk::customizer::{Context, Customizer, Edit, FileMeta, MakeDir, WriteFile};

/// The customizer; see the crate documentation.
pub struct SshKeys;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    keys: Vec<String>,
    #[serde(default = "root")]
    user: String,
    uid: Option<u32>,
    gid: Option<u32>,
    home: Option<String>,
}

fn root() -> String {
    "root".into()
}

const KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Checks one `authorized_keys` line: `[options] type base64 [comment]`, options not
/// allowed (they change what the key may do and belong in a reviewed file, not here).
fn check_key(i: usize, key: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::invalid_input(format!("configuration key `keys[{i}]`: {why}"));
    if key.contains('\n') || key.contains('\r') || key.contains('\0') {
        return Err(bad("must be a single line"));
    }
    let mut parts = key.split_whitespace();
    let kind = parts.next().ok_or_else(|| bad("is empty"))?;
    if !KEY_TYPES.contains(&kind) {
        return Err(bad(&format!(
            "`{kind}` is not an SSH public key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-*, sk-*)"
        )));
    }
    let data = parts
        .next()
        .ok_or_else(|| bad("has no key data after its type"))?;
    if data.len() < 16
        || !data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    {
        return Err(bad("its key data is not base64"));
    }
    Ok(())
}

/// `user`'s uid, gid and home from a passwd file.
fn from_passwd(passwd: &str, user: &str) -> Option<(u32, u32, String)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == user)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string())))?
    })
}

impl Customizer for SshKeys {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let s: Settings = cx.config.parse()?;
        if s.keys.is_empty() {
            return Err(Error::invalid_input(
                "configuration key `keys`: give at least one public key",
            ));
        }
        for (i, k) in s.keys.iter().enumerate() {
            check_key(i, k)?;
        }
        let (uid, gid, home) = match (s.uid, s.gid, &s.home) {
            (Some(u), Some(g), Some(h)) => (u, g, h.clone()),
            _ => match cx
                .read_to_string("/etc/passwd")?
                .as_deref()
                .and_then(|p| from_passwd(p, &s.user))
            {
                Some(found) => found,
                None if s.user == "root" => (0, 0, "/root".into()),
                None => {
                    return Err(Error::invalid_input(format!(
                        "user `{}` is not in the master's /etc/passwd; give `uid`, `gid` and `home` in the configuration",
                        s.user
                    )));
                }
            },
        };
        if !home.starts_with('/') || home.split('/').any(|c| c == "..") {
            return Err(Error::invalid_input(format!(
                "home `{home}` must be an absolute path without `..`"
            )));
        }
        let dir = format!("{}/.ssh", home.trim_end_matches('/'));
        let mut text = s.keys.join("\n");
        text.push('\n');
        Ok(vec![
            Edit::MakeDir(MakeDir {
                path: dir.clone(),
                meta: FileMeta {
                    mode: 0o700,
                    uid,
                    gid,
                },
            }),
            Edit::WriteFile(WriteFile {
                path: format!("{dir}/authorized_keys"),
                contents: text.into_bytes(),
                meta: FileMeta {
                    mode: 0o600,
                    uid,
                    gid,
                },
            }),
        ])
    }
}

mint_sdk::export_customizer!(SshKeys);

#[cfg(test)]
mod tests {
    use super::*;
    use mint_sdk::Config;
    use mint_sdk::testing::{Master, instance, written};

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@site";

    #[test]
    fn installs_keys_for_a_user_of_the_master() {
        let m = Master::new().file(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\ndeploy:x:1001:1002::/home/deploy:/bin/sh\n",
        );
        let cfg =
            Config::from_json(&format!(r#"{{"user": "deploy", "keys": ["{KEY}"]}}"#)).unwrap();
        let e = m
            .customize::<SshKeys>(&instance(0, "a", "198.18.0.1", 24), &cfg)
            .unwrap();
        assert_eq!(
            written(&e, "/home/deploy/.ssh/authorized_keys").unwrap(),
            format!("{KEY}\n")
        );
        assert!(
            matches!(&e[0], Edit::MakeDir(d) if d.meta.uid == 1001 && d.meta.gid == 1002 && d.meta.mode == 0o700)
        );
        assert!(matches!(&e[1], Edit::WriteFile(w) if w.meta.mode == 0o600));
    }

    #[test]
    fn refuses_what_is_not_a_key_or_an_unknown_user() {
        let m = Master::new();
        for (cfg, needle) in [
            (r#"{"keys": []}"#, "at least one"),
            (r#"{"keys": ["hello world"]}"#, "not an SSH public key type"),
            (r#"{"keys": ["ssh-rsa !!!notbase64!!!"]}"#, "not base64"),
            (
                r#"{"keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\nssh-rsa x"]}"#,
                "single line",
            ),
            (
                r#"{"user": "ghost", "keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq"]}"#,
                "not in the master's /etc/passwd",
            ),
        ] {
            let e = m
                .customize::<SshKeys>(
                    &instance(0, "a", "198.18.0.1", 24),
                    &Config::from_json(cfg).unwrap(),
                )
                .unwrap_err();
            assert!(e.message.contains(needle), "{needle} not in {}", e.message);
        }
    }
}
