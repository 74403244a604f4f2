//! What minting 1,000 instances of a 1 GiB master costs, in time and bytes on disk, side
//! by side in one run: mint (a disk master: one shared qcow2 overlay and a NoCloud seed per
//! instance; a tree master: an overlay of edits per instance) against `qemu-img create -b`
//! per instance and a full `cp` per instance. Full copies of 1,000 × 1 GiB do not fit the
//! disk, so `cp` is timed on a sample of copies and scaled, which the output says.
//! `cargo bench -p mint-core --bench instances` (needs about 8 GiB free).

use mint_core::{Engine, TierSpec};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const K: u32 = 1_000;
const GIB: u64 = 1 << 30;
const CP_SAMPLE: u32 = 4;

/// Bytes a tree takes on disk (allocated blocks, so holes do not count).
fn du(p: &Path) -> u64 {
    let Ok(m) = p.symlink_metadata() else {
        return 0;
    };
    let own = m.blocks() * 512;
    if m.is_dir() {
        own + std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| du(&e.path()))
            .sum::<u64>()
    } else {
        own
    }
}

/// Incompressible, non-zero bytes (xorshift), so nothing is sparse or deduplicated.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn write_random(path: &Path, len: u64, seed: &mut u64, mbr: bool) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..len / buf.len() as u64 {
        fill(&mut buf, seed);
        if mbr && i == 0 {
            buf[510] = 0x55;
            buf[511] = 0xaa;
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
    f.get_ref().sync_all().unwrap();
}

fn spec(name: &str, image: &str, subnet: &str, customizers: serde_json::Value) -> TierSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "image": image, "max-instances": K, "subnet": subnet, "gateway": subnet.replace(".0/20", ".1"),
        "dns": [subnet.replace(".0/20", ".53")], "hostname": format!("{name}-{{index:04}}"), "customizers": customizers,
        "driver": {"plugin": "noop"},
    }))
    .unwrap()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn kib(b: u64) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("mint-instances-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;

    println!("minting {K} instances of a 1 GiB master (one run; bytes are allocated blocks)\n");
    // ---- a disk master -------------------------------------------------------------
    let raw = dir.join("master.raw");
    write_random(&raw, GIB, &mut seed, true);
    let engine = Engine::open(&dir.join("data")).unwrap();
    engine.plugins.preload_bundled().unwrap();
    let t = Instant::now();
    let image = engine.import_image(&raw, Some("cloud")).unwrap();
    println!(
        "import the 1 GiB raw master (copy + sha256)          {:>9.2} s",
        t.elapsed().as_secs_f64()
    );
    let before = du(&dir.join("data"));
    let customizers = serde_json::json!([
        {"plugin": "hostname"},
        {"plugin": "files", "config": {"files": [{"path": "/etc/motd", "template": "{hostname} ({address})\n"}]}},
        {"plugin": "cloud-init", "config": {"user-data": {"packages": ["nginx"]}}},
    ]);
    let t = Instant::now();
    rt.block_on(engine.create_tier(
        &spec("vm", &image.digest, "198.18.0.0/20", customizers),
        "admin:test",
    ))
    .unwrap();
    let mint_disk_s = t.elapsed().as_secs_f64();
    let mint_disk_bytes = du(&dir.join("data")) - before;
    let master_bytes = du(&engine.images.disk(&image.digest, "raw"));
    // An instance's delta: its customization (the edits its seed carries).
    let delta = engine
        .store
        .overlay(&engine.store.instances("vm").unwrap()[0].overlay)
        .unwrap()
        .len() as u64;

    // qemu-img create -b, one overlay per instance.
    let qdir = dir.join("qemu");
    std::fs::create_dir_all(&qdir).unwrap();
    let t = Instant::now();
    for i in 0..K {
        let out = qdir.join(format!("vm-{i:04}.qcow2"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&raw)
            .arg(&out)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "qemu-img create failed");
    }
    let qemu_s = t.elapsed().as_secs_f64();
    let qemu_bytes = du(&qdir);
    std::fs::remove_dir_all(&qdir).unwrap();

    // cp, a sample of full copies, scaled to K.
    let cdir = dir.join("cp");
    std::fs::create_dir_all(&cdir).unwrap();
    let t = Instant::now();
    for i in 0..CP_SAMPLE {
        let out = cdir.join(format!("vm-{i}.raw"));
        assert!(
            Command::new("cp")
                .arg(&raw)
                .arg(&out)
                .status()
                .unwrap()
                .success()
        );
        std::fs::File::open(&out).unwrap().sync_all().unwrap();
    }
    let cp_each = t.elapsed().as_secs_f64() / f64::from(CP_SAMPLE);
    let cp_bytes_each = du(&cdir) / u64::from(CP_SAMPLE);
    std::fs::remove_dir_all(&cdir).unwrap();
    let cp_s = cp_each * f64::from(K);
    let cp_bytes = cp_bytes_each * u64::from(K);

    println!(
        "{:<44} {:>10} {:>14} {:>16}",
        "disk master, K = 1000", "time", "bytes on disk", "per instance"
    );
    println!(
        "{:<44} {:>8.2} s {:>14} {:>16}",
        "mint (shared overlay + seed each)",
        mint_disk_s,
        mib(mint_disk_bytes),
        kib(mint_disk_bytes / u64::from(K))
    );
    println!(
        "{:<44} {:>8.2} s {:>14} {:>16}",
        "qemu-img create -b per instance",
        qemu_s,
        mib(qemu_bytes),
        kib(qemu_bytes / u64::from(K))
    );
    println!(
        "{:<44} {:>8.0} s {:>14} {:>16}",
        format!("cp per instance (scaled from {CP_SAMPLE} copies)"),
        cp_s,
        mib(cp_bytes),
        mib(cp_bytes_each)
    );
    let budget = master_bytes + u64::from(K) * (delta + (64 << 10));
    println!(
        "  master {} + mint {} = {} against master + K x (delta {} B + 64 KiB) = {}: {}",
        mib(master_bytes),
        mib(mint_disk_bytes),
        mib(master_bytes + mint_disk_bytes),
        delta,
        mib(budget),
        if master_bytes + mint_disk_bytes <= budget {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  mint is {:.0}x faster than full copies (target >= 100x: {}), {:.1}x the time of qemu-img create -b",
        cp_s / mint_disk_s,
        if cp_s / mint_disk_s >= 100.0 {
            "met"
        } else {
            "MISSED"
        },
        mint_disk_s / qemu_s
    );
    drop(engine);

    // ---- a tree master ---------------------------------------------------------------
    let tree = dir.join("rootfs");
    std::fs::create_dir_all(tree.join("usr/lib/data")).unwrap();
    std::fs::create_dir_all(tree.join("etc/network")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "debian\n").unwrap();
    std::fs::write(tree.join("etc/hosts"), "127.0.0.1\tlocalhost\n").unwrap();
    std::fs::write(
        tree.join("etc/network/interfaces"),
        "auto eth0\niface eth0 inet dhcp\n",
    )
    .unwrap();
    for i in 0..256 {
        write_random(
            &tree.join(format!("usr/lib/data/blob-{i:03}")),
            GIB / 256,
            &mut seed,
            false,
        );
    }
    let _ = std::fs::remove_file(&raw);
    let engine = Engine::open(&dir.join("data2")).unwrap();
    engine.plugins.preload_bundled().unwrap();
    let t = Instant::now();
    let image = engine.import_image(&tree, Some("rootfs")).unwrap();
    println!(
        "\nimport the 1 GiB tree master (its canonical tar)     {:>9.2} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "  the master on the engine's disk: {} (one copy; the source tree is {})",
        mib(du(&engine.images.tar(&image.digest))),
        mib(du(&tree))
    );
    let before = du(&dir.join("data2"));
    let t = Instant::now();
    rt.block_on(engine.create_tier(
        &spec(
            "web",
            &image.digest,
            "198.18.16.0/20",
            serde_json::json!([{"plugin": "hostname"}, {"plugin": "network"}]),
        ),
        "admin:test",
    ))
    .unwrap();
    let mint_tree_s = t.elapsed().as_secs_f64();
    // Written through sled, whose files grow in steps; count what the state directory gained.
    let mint_tree_bytes = du(&dir.join("data2")) - before;
    let edits = engine
        .store
        .overlay(&engine.store.instances("web").unwrap()[0].overlay)
        .unwrap()
        .len();
    // What a deployed instance adds: nothing is built when a node asks, so a deployed
    // instance costs what a minted one does; what a node that caches the master fetches
    // to redeploy is the descriptor and the layer.
    let served = engine.artifact("web", 7).unwrap();
    let descriptor = serde_json::to_vec(&served).unwrap().len() as u64;
    let layer = served.parts[1].size;
    let on_wire = descriptor + layer;
    let target = edits as u64 + (64 << 10);
    println!(
        "  per deployed instance on the engine's disk: {} (its layer {layer} B; target <= edits + 64 KiB = {target} B: {})",
        kib(mint_tree_bytes / u64::from(K)),
        if mint_tree_bytes / u64::from(K) <= target {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  on the wire to redeploy on a node caching the master: descriptor {descriptor} B + layer {layer} B = {on_wire} B (target <= {target} B: {})",
        if on_wire <= target { "met" } else { "MISSED" }
    );
    let t = Instant::now();
    let m = engine.materialize("web", 0, &dir.join("web-0")).unwrap();
    let mat_s = t.elapsed().as_secs_f64();
    let cp_tree = Instant::now();
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&tree)
            .arg(dir.join("tree-copy"))
            .status()
            .unwrap()
            .success()
    );
    let cp_tree_s = cp_tree.elapsed().as_secs_f64();
    println!(
        "{:<44} {:>10} {:>14} {:>16}",
        "tree master, K = 1000", "time", "bytes on disk", "per instance"
    );
    println!(
        "{:<44} {:>8.2} s {:>14} {:>16}",
        "mint (an overlay of edits each)",
        mint_tree_s,
        mib(mint_tree_bytes),
        kib(mint_tree_bytes / u64::from(K))
    );
    println!(
        "{:<44} {:>8.0} s {:>14} {:>16}",
        "cp -a per instance (scaled from 1 copy)",
        cp_tree_s * f64::from(K),
        mib(du(&dir.join("tree-copy")) * u64::from(K)),
        mib(du(&dir.join("tree-copy")))
    );
    println!(
        "  an instance's edits: {edits} bytes; mint is {:.0}x faster than full copies",
        cp_tree_s * f64::from(K) / mint_tree_s
    );
    println!(
        "  materializing one instance ({:?}, {} files, {} bytes copied): {:.3} s",
        m.method, m.files, m.bytes_copied, mat_s
    );
    let _ = std::fs::remove_dir_all(&dir);
}
