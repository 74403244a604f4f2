//! Initramfs pieces shared by the project's builders (the deploy ISO and the boot stage,
//! made by `cargo xtask`) and the engine (the modules archive a network-booted kernel
//! loads): the kernel's `newc` archive format and the closure of kernel modules over
//! `modules.dep`.

use std::collections::{BTreeSet, HashMap};

/// A `newc` cpio archive being written in memory, as the kernel unpacks an initramfs.
/// Several archives concatenated are one initramfs to the kernel, so the engine can add
/// a master's modules to a boot stage without unpacking either.
#[derive(Debug, Default)]
pub struct Newc {
    out: Vec<u8>,
    ino: u32,
}

impl Newc {
    /// An empty archive.
    pub fn new() -> Newc {
        Newc::default()
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// A directory (mode 0755) at `name` (relative, no leading `/`).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    /// Every directory above `name`, then none twice: the kernel creates no parents.
    pub fn parents(&mut self, name: &str, made: &mut BTreeSet<String>) {
        let mut at = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(p);
            if made.insert(at.clone()) {
                self.dir(&at);
            }
        }
    }

    /// A regular file with permission bits `mode` (within 0o7777).
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (mode & 0o7777), data);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The module name of a `modules.dep` path (`kernel/fs/fat/vfat.ko.xz` -> `vfat`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The paths (relative to the modules directory) of the modules `wanted` and everything
/// they need, as `modules.dep` lists it (each line holds its module's whole closure). A
/// wanted driver that is built into the kernel has no line and adds nothing.
pub fn module_closure(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let deps: HashMap<String, (&str, Vec<&str>)> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (module_name(m), (m, d.split_whitespace().collect())))
        .collect();
    let known: BTreeSet<&str> = deps.values().map(|(p, _)| *p).collect();
    let mut out = BTreeSet::new();
    for w in wanted {
        let Some((path, needs)) = deps.get(&w.replace('-', "_")) else {
            continue;
        };
        out.insert(path.to_string());
        out.extend(
            needs
                .iter()
                .filter(|n| known.contains(*n))
                .map(|n| n.to_string()),
        );
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closure_holds_what_the_wanted_need_and_skips_built_in_drivers() {
        let dep = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
                   kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/net/core/failover.ko:\n\
                   kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz\n\
                   kernel/fs/fat/fat.ko.xz:\n";
        assert_eq!(
            module_closure(dep, &["virtio-net", "e1000"]),
            [
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/net/core/failover.ko"
            ]
        );
        assert_eq!(module_name("kernel/fs/fat/vfat.ko.xz"), "vfat");
    }

    #[test]
    fn entries_are_aligned_and_the_archive_ends_with_its_trailer() {
        let mut a = Newc::new();
        let mut made = BTreeSet::new();
        a.parents("lib/modules/6.1/x.ko", &mut made);
        a.file("lib/modules/6.1/x.ko", 0o644, b"abc");
        a.symlink("bin/sh", "busybox");
        let out = a.finish();
        assert_eq!(made.len(), 3);
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        assert!(text.contains("lib/modules/6.1/x.ko\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The header's file size field (the seventh, 8 hex digits) of the module.
        let at = text.find("lib/modules/6.1/x.ko").unwrap();
        assert_eq!(&text[at - 110 + 54..at - 110 + 62], "00000003");
    }
}
