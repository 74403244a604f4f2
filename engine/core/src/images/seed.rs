//! NoCloud seeds: the `cidata` volume that gives an instance of a disk master its
//! pre-assigned identity when a standard cloud image boots, without touching the master.
//!
//! The volume is FAT (what `cloud-localds` also writes) labelled `cidata`, holding
//! `meta-data` (instance id and host name), `network-config` (version 2, the instance's
//! static address) and `user-data` (`#cloud-config` carrying the customizers' file edits as
//! `write_files` and the rest as `runcmd`). The YAML files quote every scalar as JSON, and
//! the user-data body is JSON (which YAML reads), so no value can change a document's
//! structure.

use super::{ImageError, io};
use mint_plugins::types as wit;
use serde_json::json;
use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write};
use std::net::IpAddr;

/// The identity a seed carries.
pub struct SeedIdentity<'a> {
    /// Tier name.
    pub tier: &'a str,
    /// Index in the tier.
    pub index: u32,
    /// Host name.
    pub hostname: &'a str,
    /// Address and prefix length.
    pub address: IpAddr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    pub dns: &'a [IpAddr],
    /// Digest of the instance's customization, so a changed customization is a new
    /// instance to cloud-init (which runs its per-instance steps again).
    pub customization: &'a str,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

/// Where the `cloud-init` customizer writes a seed inside a tree instance; on a disk master
/// those files become the `cidata` volume's.
pub const SEED_DIR: &str = "/var/lib/cloud/seed/nocloud";

/// The three seed files, as text: `meta-data`, `network-config`, `user-data`. A seed the
/// customizers wrote (the `cloud-init` step) is taken as the base; the identity fills what
/// it lacks, and every other edit joins the user-data as `write_files` or `runcmd`.
pub fn files(
    id: &SeedIdentity<'_>,
    edits: &[wit::Edit],
) -> Result<[(&'static str, String); 3], ImageError> {
    let from_step = |name: &str| {
        let path = format!("{SEED_DIR}/{name}");
        edits.iter().rev().find_map(|e| match e {
            wit::Edit::WriteFile(w) if w.path == path => {
                Some(String::from_utf8_lossy(&w.contents).into_owned())
            }
            _ => None,
        })
    };
    let short = id
        .customization
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or("");
    let meta = from_step("meta-data").unwrap_or_else(|| {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            q(&format!("mint-{}-{}-{short}", id.tier, id.index)),
            q(id.hostname)
        )
    });
    let net = from_step("network-config").unwrap_or_else(|| {
        let mut net =
            String::from("version: 2\nethernets:\n  primary:\n    match:\n      name: \"e*\"\n");
        let _ = writeln!(
            net,
            "    addresses:\n      - {}",
            q(&format!("{}/{}", id.address, id.prefix_len))
        );
        if let Some(gw) = id.gateway {
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            let _ = writeln!(
                net,
                "    routes:\n      - to: {}\n        via: {}",
                q(to),
                q(&gw.to_string())
            );
        }
        if !id.dns.is_empty() {
            net.push_str("    nameservers:\n      addresses:\n");
            for d in id.dns {
                let _ = writeln!(net, "        - {}", q(&d.to_string()));
            }
        }
        net
    });
    let mut doc = match from_step("user-data") {
        Some(text) => {
            let body = text.strip_prefix("#cloud-config\n").unwrap_or(&text);
            match serde_json::from_str::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => {
                    return Err(ImageError::Invalid(format!(
                        "{SEED_DIR}/user-data must be `#cloud-config` followed by a JSON object for mint to add the other edits to it"
                    )));
                }
            }
        }
        None => serde_json::Map::new(),
    };
    doc.entry("hostname").or_insert(json!(id.hostname));
    doc.entry("preserve_hostname").or_insert(json!(false));
    use base64::Engine as _;
    let mut writes = Vec::new();
    let mut cmds = Vec::new();
    for e in edits {
        match e {
            wit::Edit::WriteFile(w) if w.path.starts_with(SEED_DIR) => {}
            wit::Edit::WriteFile(w) => {
                let mut f = json!({
                    "path": w.path,
                    "encoding": "b64",
                    "content": base64::engine::general_purpose::STANDARD.encode(&w.contents),
                    "permissions": format!("{:04o}", w.meta.mode),
                });
                if w.meta.uid != 0 || w.meta.gid != 0 {
                    f["owner"] = json!(format!("{}:{}", w.meta.uid, w.meta.gid));
                }
                writes.push(f);
            }
            wit::Edit::Remove(p) => cmds.push(json!(["rm", "-rf", "--", p])),
            wit::Edit::Symlink(s) => cmds.push(json!(["ln", "-sfn", "--", s.target, s.path])),
            wit::Edit::MakeDir(d) => cmds.push(json!([
                "install",
                "-d",
                "-m",
                format!("{:04o}", d.meta.mode),
                "--",
                d.path
            ])),
        }
    }
    let mut append = |key: &str, items: Vec<serde_json::Value>| {
        if items.is_empty() {
            return;
        }
        match doc.entry(key).or_insert(json!([])) {
            serde_json::Value::Array(list) => list.extend(items),
            other => *other = serde_json::Value::Array(items),
        }
    };
    append("write_files", writes);
    append("runcmd", cmds);
    let user = format!(
        "#cloud-config\n{}\n",
        serde_json::to_string_pretty(&serde_json::Value::Object(doc)).expect("JSON serialises")
    );
    Ok([
        ("meta-data", meta),
        ("network-config", net),
        ("user-data", user),
    ])
}

/// The size of a 3.5-inch floppy (1440 KiB), the virtual medium many BMCs offer for a seed.
pub const FLOPPY_BYTES: u64 = 1_474_560;

/// A FAT volume labelled `cidata` holding `files`: exactly a floppy's size when the files
/// fit in one with room to spare (so a BMC's virtual floppy takes it as it is), else a
/// whole number of MiB.
pub fn volume(files: &[(&str, String)]) -> Result<Vec<u8>, ImageError> {
    fat_volume(*b"cidata     ", files)
}

/// A FAT volume labelled `label` (padded with spaces to 11 bytes) holding `files`, sized as
/// [`volume`] sizes a seed.
pub fn fat_volume(label: [u8; 11], files: &[(&str, String)]) -> Result<Vec<u8>, ImageError> {
    let content: usize = files.iter().map(|(_, t)| t.len()).sum();
    // Room for the files twice over and the file system's own tables; FAT12 up to 32 MiB.
    let size = if 2 * content + (64 << 10) <= FLOPPY_BYTES as usize {
        FLOPPY_BYTES as usize
    } else {
        (2 * content + (1 << 20)).next_multiple_of(1 << 20)
    };
    let fat =
        |e: std::io::Error| ImageError::Invalid(format!("cannot build the NoCloud seed: {e}"));
    let mut disk = std::io::Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(label),
    )
    .map_err(fat)?;
    label_entry(disk.get_mut(), label);
    {
        disk.seek(SeekFrom::Start(0)).map_err(fat)?;
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        let root = fs.root_dir();
        for (name, text) in files {
            let mut f = root.create_file(name).map_err(fat)?;
            f.write_all(text.as_bytes()).map_err(fat)?;
            f.flush().map_err(fat)?;
        }
    }
    Ok(disk.into_inner())
}

/// Adds the volume-label entry to the root directory. `format_volume` writes the label
/// only into the boot sector; blkid, and so cloud-init's search for `LABEL=cidata`, also
/// reads the root directory's entry, as mkfs.vfat writes it.
fn label_entry(img: &mut [u8], label: [u8; 11]) {
    let u16le = |at: usize| u16::from_le_bytes([img[at], img[at + 1]]) as usize;
    let bytes_per_sector = u16le(11);
    let reserved = u16le(14);
    let fats = img[16] as usize;
    let per_fat = u16le(22);
    let root = (reserved + fats * per_fat) * bytes_per_sector;
    let mut entry = [0u8; 32];
    entry[..11].copy_from_slice(&label);
    entry[11] = 0x08;
    img[root..root + 32].copy_from_slice(&entry);
}

/// Writes `bytes` to `path` leaving holes where whole 4 KiB blocks are zero, so a mostly
/// empty volume costs only its used blocks on disk; with `sync`, flushed before returning.
pub fn write_sparse(path: &std::path::Path, bytes: &[u8], sync: bool) -> Result<(), ImageError> {
    let mut f =
        std::fs::File::create(path).map_err(io(format!("cannot write {}", path.display())))?;
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|b| *b != 0) {
            f.seek(SeekFrom::Start((i * 4096) as u64))
                .map_err(io("cannot seek"))?;
            f.write_all(block)
                .map_err(io(format!("cannot write {}", path.display())))?;
        }
    }
    f.set_len(bytes.len() as u64)
        .map_err(io("cannot size the file"))?;
    if sync {
        f.sync_all().map_err(io("cannot sync"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(img: Vec<u8>, name: &str) -> String {
        let fs =
            fatfs::FileSystem::new(std::io::Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "cidata");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut fs.root_dir().open_file(name).unwrap(), &mut text)
            .unwrap();
        text
    }

    #[test]
    fn a_small_seed_is_exactly_a_floppy_and_a_large_one_is_not() {
        let small = volume(&[
            ("meta-data", "instance-id: a\n".into()),
            ("user-data", "#cloud-config\n{}\n".into()),
        ])
        .unwrap();
        assert_eq!(small.len() as u64, FLOPPY_BYTES);
        assert_eq!(read_back(small, "meta-data"), "instance-id: a\n");
        let big_text = "x".repeat(900 << 10);
        let big = volume(&[("user-data", big_text.clone())]).unwrap();
        assert!(
            big.len() as u64 > FLOPPY_BYTES && big.len() % (1 << 20) == 0,
            "{}",
            big.len()
        );
        assert_eq!(read_back(big, "user-data"), big_text);
    }
}
