//! What a network-booted node gets from the engine before its instance runs: the kernel
//! of its tier's tree master (from the master's `/boot`) and an initramfs archive of that
//! kernel's own NIC drivers (from the master's `/lib/modules`), which the boot stage loads
//! before it fetches the instance. Built from the master's canonical tar, read in place;
//! the master's files are never changed.

use std::path::Path;

use crate::EngineError;
use crate::images::tree::{Kind, TreeIndex};

/// The NIC drivers a boot stage loads when the operator names none: virtual machines'
/// and the common server NICs.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "bnxt_en",
    "tg3",
    "mlx5_core",
    "r8169",
];

/// A master's boot files.
#[derive(Debug)]
pub struct BootFiles {
    /// The kernel release (`6.1.0-28-amd64`).
    pub release: String,
    /// The kernel image.
    pub kernel: Vec<u8>,
    /// A `newc` archive: the wanted modules with what they need, `modules.dep` and
    /// `modules.builtin`, and `etc/mint-modules` naming what to load.
    pub modules: Vec<u8>,
    /// How many module files it holds.
    pub module_count: usize,
}

/// The release of a `vmlinuz-RELEASE` name.
fn release(name: &str) -> Option<&str> {
    name.strip_prefix("vmlinuz-").filter(|r| !r.is_empty())
}

/// Release strings ordered as versions (`6.1.0-9` before `6.1.0-28`).
fn version_key(r: &str) -> Vec<(u64, String)> {
    r.split(['.', '-'])
        .map(|p| (p.parse().unwrap_or(0), p.to_string()))
        .collect()
}

/// The kernel of the master at `tar` (the newest `/boot/vmlinuz-*`) and an archive of its
/// modules `wanted` (names; those built into the kernel need none).
pub fn boot_files(tar: &Path, wanted: &[String]) -> Result<BootFiles, EngineError> {
    let index = TreeIndex::read(tar)?;
    let boot = index
        .resolve("/boot", true)
        .ok()
        .flatten()
        .ok_or_else(|| EngineError::Invalid("the master has no /boot: network boot needs a tree master with a kernel in /boot (vmlinuz-RELEASE)".into()))?;
    let kernel_of = |rel: &str| -> Option<String> {
        index
            .resolve(&format!("/{boot}/vmlinuz-{rel}"), true)
            .ok()
            .flatten()
            .filter(|p| index.get(p).is_some_and(|e| e.kind == Kind::File))
    };
    let mut releases: Vec<String> = index
        .children(&boot)
        .filter_map(|(n, _)| release(n).map(str::to_string))
        .filter(|r| kernel_of(r).is_some())
        .collect();
    releases.sort_by_key(|r| version_key(r));
    let rel = releases.pop().ok_or_else(|| {
        EngineError::Invalid(
            "the master's /boot holds no vmlinuz-RELEASE: install a kernel in the master (Debian: linux-image-amd64)".into(),
        )
    })?;
    let read = |path: &str| -> Result<Vec<u8>, EngineError> {
        let e = index
            .get(path)
            .ok_or_else(|| EngineError::Invalid(format!("the master has no /{path}")))?;
        index
            .read_data(e)
            .map_err(|e| EngineError::Invalid(format!("reading the master's /{path}: {e}")))
    };
    let kernel = read(&kernel_of(&rel).unwrap_or_default())?;
    let modules_dir = index
        .resolve(&format!("/lib/modules/{rel}"), true)
        .ok()
        .flatten()
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "the master has a kernel {rel} but no /lib/modules/{rel}: its NIC drivers cannot be loaded"
            ))
        })?;
    let dep = String::from_utf8_lossy(&read(&format!("{modules_dir}/modules.dep"))?).into_owned();
    let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let files = mint_initramfs::module_closure(&dep, &names);
    let mut out = mint_initramfs::Newc::new();
    let mut made = std::collections::BTreeSet::new();
    let at = format!("lib/modules/{rel}");
    let mut add = |out: &mut mint_initramfs::Newc, rel_path: &str, data: &[u8]| {
        let name = format!("{at}/{rel_path}");
        out.parents(&name, &mut made);
        out.file(&name, 0o644, data);
    };
    for f in &files {
        let real = index
            .resolve(&format!("/{modules_dir}/{f}"), true)
            .ok()
            .flatten()
            .unwrap_or_default();
        add(&mut out, f, &read(&real)?);
    }
    add(&mut out, "modules.dep", dep.as_bytes());
    for f in ["modules.builtin", "modules.order"] {
        if let Ok(data) = read(&format!("{modules_dir}/{f}")) {
            add(&mut out, f, &data);
        }
    }
    // Only what is there to load; a built-in driver needs no modprobe.
    let present: Vec<String> = files
        .iter()
        .map(|f| mint_initramfs::module_name(f))
        .filter(|m| names.iter().any(|w| w.replace('-', "_") == *m))
        .collect();
    out.parents("etc/mint-modules", &mut made);
    out.file(
        "etc/mint-modules",
        0o644,
        (present.join("\n") + "\n").as_bytes(),
    );
    Ok(BootFiles {
        release: rel,
        kernel,
        module_count: files.len(),
        modules: out.finish(),
    })
}

/// Where the boot stage finds the CA certificates it trusts for the engine and a blob cache,
/// once [`trust_archive`] is loaded as one more initramfs.
pub const TRUST_PATH: &str = "etc/mint/ca.pem";

/// An initramfs archive holding `pem` (CA certificates) at [`TRUST_PATH`]. A boot stage given
/// it checks the engine's and a blob cache's certificates against that CA, where the pin on
/// its command line admits the engine's key alone.
pub fn trust_archive(pem: &[u8]) -> Vec<u8> {
    let mut out = mint_initramfs::Newc::new();
    let mut made = std::collections::BTreeSet::new();
    out.parents(TRUST_PATH, &mut made);
    out.file(TRUST_PATH, 0o644, pem);
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_kernel_release_sorts_last() {
        let mut r = vec!["6.1.0-28-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        r.sort_by_key(|r| version_key(r));
        assert_eq!(r, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-28-amd64"]);
        assert_eq!(release("vmlinuz-6.1.0-28-amd64"), Some("6.1.0-28-amd64"));
        assert_eq!(release("vmlinuz-"), None);
        assert_eq!(release("initrd.img-6.1"), None);
    }
}
