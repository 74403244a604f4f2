//! What the daemon's benchmarks share: a scratch directory and the small tree master they
//! import.

use std::path::PathBuf;

/// A fresh scratch directory `mint-NAME-PID` and, in it, a master with a host name and an
/// ifupdown network configuration; returns both.
pub fn scratch_with_master(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("mint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let master = dir.join("master");
    for (p, t) in [
        ("etc/hostname", "debian\n"),
        (
            "etc/network/interfaces",
            "auto eth0\niface eth0 inet dhcp\n",
        ),
        ("sbin/ifup", ""),
    ] {
        let f = master.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, t).unwrap();
    }
    (dir, master)
}
