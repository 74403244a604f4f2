//! Master images in every format mint imports: tar archives compressed by the real `gzip`
//! and `zstd`, OCI image layouts with whiteouts, qcow2 and raw disks made by the real
//! `qemu-img`; and each kind of bad input refused with nothing stored.

use crate::support::scratch;
use mint_core::images::disk;
use mint_core::{Engine, SourceFormat};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> std::process::Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A small root filesystem.
fn tree(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for (p, t) in [
        ("etc/hostname", "debian\n"),
        (
            "etc/network/interfaces",
            "auto eth0\niface eth0 inet dhcp\n",
        ),
        ("usr/share/doc/readme", "hello\n"),
    ] {
        std::fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
        std::fs::write(root.join(p), t).unwrap();
    }
    std::os::unix::fs::symlink("/etc/hostname", root.join("etc/name-link")).unwrap();
    root
}

fn tar_of(root: &Path, out: &Path) {
    run(Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(out)
        .arg("."));
}

#[test]
fn compressed_tars_import_as_the_same_tree() {
    let dir = scratch("images-tar");
    let root = tree(&dir);
    let engine = Engine::open(&dir.join("data")).unwrap();
    let from_dir = engine.import_image(&root, None).unwrap();
    assert_eq!(
        (from_dir.format.as_str(), from_dir.source.as_str()),
        ("tree", "dir")
    );
    let plain = dir.join("root.tar");
    tar_of(&root, &plain);
    run(Command::new("gzip").arg("-k").arg(&plain));
    run(Command::new("zstd").arg("-q").arg("-k").arg(&plain));
    for (file, source) in [
        ("root.tar", "tar"),
        ("root.tar.gz", "tar+gzip"),
        ("root.tar.zst", "tar+zstd"),
    ] {
        let image = engine.import_image(&dir.join(file), None).unwrap();
        assert_eq!(
            image.digest, from_dir.digest,
            "{file}: the same tree, the same digest"
        );
        assert_eq!(image.source, source);
    }
    // A compressed archive under a name that says nothing is read by its contents.
    std::fs::copy(dir.join("root.tar.zst"), dir.join("blob")).unwrap();
    assert_eq!(
        engine.import_image(&dir.join("blob"), None).unwrap().digest,
        from_dir.digest
    );

    // A truncated gzip stream is refused, and nothing is stored.
    let gz = std::fs::read(dir.join("root.tar.gz")).unwrap();
    std::fs::write(dir.join("cut.tar.gz"), &gz[..gz.len() / 2]).unwrap();
    let images = engine.store.images().unwrap().len();
    let e = engine
        .import_image(&dir.join("cut.tar.gz"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
    assert_eq!(engine.store.images().unwrap().len(), images);
}

/// Writes `files` (path, contents; a `None` content is a directory) as a gzip layer blob
/// and returns its descriptor.
fn layer(layout: &Path, files: &[(&str, Option<&str>)]) -> serde_json::Value {
    let src = layout.parent().unwrap().join(format!(
        "layer-src-{}",
        std::fs::read_dir(layout.join("blobs/sha256"))
            .unwrap()
            .count()
    ));
    std::fs::create_dir_all(&src).unwrap();
    for (p, content) in files {
        match content {
            Some(text) => {
                std::fs::create_dir_all(src.join(p).parent().unwrap()).unwrap();
                std::fs::write(src.join(p), text).unwrap();
            }
            None => std::fs::create_dir_all(src.join(p)).unwrap(),
        }
    }
    let tar = src.with_extension("tar");
    tar_of(&src, &tar);
    run(Command::new("gzip").arg("-f").arg(&tar));
    blob(
        layout,
        &std::fs::read(tar.with_extension("tar.gz")).unwrap(),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )
}

fn blob(layout: &Path, bytes: &[u8], media_type: &str) -> serde_json::Value {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// An OCI layout of `layers`, with a config and a manifest as podman writes them.
fn layout(dir: &Path, name: &str, layers: &[&[(&str, Option<&str>)]]) -> PathBuf {
    let layout = dir.join(name);
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    let descs: Vec<serde_json::Value> = layers.iter().map(|l| layer(&layout, l)).collect();
    let config = blob(
        &layout,
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": descs});
    let m = blob(
        &layout,
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [m]}).to_string(),
    )
    .unwrap();
    layout
}

#[test]
fn oci_layouts_flatten_their_layers_honouring_whiteouts() {
    let dir = scratch("images-oci");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let base: &[(&str, Option<&str>)] = &[
        ("etc/hostname", Some("debian\n")),
        ("etc/old.conf", Some("old\n")),
        ("usr/share/doc/a", Some("a\n")),
        ("usr/share/doc/b", Some("b\n")),
        ("var/cache/apt/pkgcache.bin", Some("cache\n")),
    ];
    let top: &[(&str, Option<&str>)] = &[
        ("etc/.wh.old.conf", Some("")),
        ("usr/share/doc/.wh..wh..opq", Some("")),
        ("usr/share/doc/c", Some("c\n")),
        ("var/.wh.cache", Some("")),
        ("etc/hostname", Some("changed\n")),
    ];
    let oci = layout(&dir, "oci", &[base, top]);
    let image = engine.import_image(&oci, Some("app")).unwrap();
    assert_eq!(image.source, "oci");
    let t = dir.join("unpacked");
    mint_core::images::archive::unpack_checked(&engine.images.tar(&image.digest), &t).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.join("etc/hostname")).unwrap(),
        "changed\n"
    );
    assert!(
        !t.join("etc/old.conf").exists() && !t.join("var/cache").exists(),
        "whited out"
    );
    let docs: Vec<String> = std::fs::read_dir(t.join("usr/share/doc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        docs,
        ["c"],
        "the opaque directory hides what lower layers put there"
    );
    assert!(
        !t.join("etc/.wh.old.conf").exists(),
        "whiteout markers are not files of the image"
    );

    // The same tree as a directory has the same digest.
    let same = dir.join("same");
    for (p, c) in [("etc/hostname", "changed\n"), ("usr/share/doc/c", "c\n")] {
        std::fs::create_dir_all(same.join(p).parent().unwrap()).unwrap();
        std::fs::write(same.join(p), c).unwrap();
    }
    std::fs::create_dir_all(same.join("var")).unwrap();
    for d in ["etc", "usr", "usr/share", "usr/share/doc", "var"] {
        let mode = std::fs::metadata(t.join(d)).unwrap().permissions();
        std::fs::set_permissions(same.join(d), mode).unwrap();
    }
    assert_eq!(
        engine.import_image(&same, Some("same")).unwrap().digest,
        image.digest
    );

    // Bad layouts: a missing blob, a blob whose bytes are not its digest, a whiteout that
    // would reach through a lower layer's symlink. Each refused, nothing stored.
    let count = engine.store.images().unwrap().len();
    // The first layer's blob name in a layout (each layout's tars differ in their times).
    let first_layer = |layout: &Path| -> String {
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(layout.join("index.json")).unwrap())
                .unwrap();
        let m_hex = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(&m_hex)).unwrap(),
        )
        .unwrap();
        m["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };
    let missing = layout(&dir, "missing", &[base]);
    let layer_hex = first_layer(&missing);
    std::fs::remove_file(missing.join("blobs/sha256").join(&layer_hex)).unwrap();
    let e = engine.import_image(&missing, None).unwrap_err().to_string();
    assert!(
        e.contains(&format!("blob sha256:{layer_hex} is missing")),
        "{e}"
    );

    let altered = layout(&dir, "altered", &[base]);
    let path = altered.join("blobs/sha256").join(first_layer(&altered));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let e = engine.import_image(&altered, None).unwrap_err().to_string();
    assert!(e.contains("has the wrong digest"), "{e}");

    let victim = dir.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep"), "mine\n").unwrap();
    let linked = dir.join("linked-src");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(&victim, linked.join("etc2")).unwrap();
    let escape = layout(
        &dir,
        "escape",
        &[
            &[("etc/hostname", Some("x\n"))],
            &[("etc2/.wh.keep", Some(""))],
        ],
    );
    // Put the symlink into the first layer by rebuilding it with the link.
    let first = escape.join("first.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&linked)
        .arg("-cf")
        .arg(&first)
        .arg("."));
    let first_bytes = std::fs::read(&first).unwrap();
    let d = blob(
        &escape,
        &first_bytes,
        "application/vnd.oci.image.layer.v1.tar",
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(escape.join("index.json")).unwrap()).unwrap();
    let mhex = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(escape.join("blobs/sha256").join(&mhex)).unwrap())
            .unwrap();
    m["layers"][0] = d;
    let md = blob(
        &escape,
        m.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(
        escape.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [md]}).to_string(),
    )
    .unwrap();
    let e = engine.import_image(&escape, None).unwrap_err().to_string();
    assert!(e.contains("is a symlink in a lower layer"), "{e}");
    assert_eq!(
        std::fs::read_to_string(victim.join("keep")).unwrap(),
        "mine\n",
        "nothing outside the image is touched"
    );
    assert_eq!(engine.store.images().unwrap().len(), count);
}

fn qemu_img_json(args: &[&str], file: &Path) -> serde_json::Value {
    let o = run(Command::new("qemu-img")
        .args(args)
        .arg("--output=json")
        .arg(file));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A raw disk with an MBR signature and some data, so a qcow2 made from it has clusters.
fn raw_disk(path: &Path, mib: usize) {
    let mut bytes = vec![0u8; mib << 20];
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    for (i, b) in bytes[1 << 20..(1 << 20) + 300_000].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8 + 1;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn disk_masters_are_checked_stored_read_only_and_overlaid() {
    let dir = scratch("images-disk");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 8);
    let q = dir.join("cloud.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));

    let image = engine.import_image(&q, Some("cloud")).unwrap();
    assert_eq!(
        (image.format.as_str(), image.virtual_size),
        ("qcow2", 8 << 20)
    );
    let stored = engine.images.disk(&image.digest, "qcow2");
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(std::fs::read(&stored).unwrap()))
        ),
        image.digest
    );
    assert!(
        std::fs::metadata(&stored).unwrap().permissions().readonly(),
        "a master is never changed"
    );
    let r = engine.import_image(&raw, None).unwrap();
    assert_eq!((r.format.as_str(), r.virtual_size), ("raw", 8 << 20));

    // An overlay backed by the master: what qemu-img itself reads of it.
    let overlay = stored.parent().unwrap().join("test-overlay.qcow2");
    disk::write_overlay(
        &overlay,
        stored.file_name().unwrap().to_str().unwrap(),
        "qcow2",
        image.virtual_size,
    )
    .unwrap();
    let info = qemu_img_json(&["info"], &overlay);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 8 << 20);
    assert_eq!(
        info["backing-filename"],
        stored.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    let check = qemu_img_json(&["check"], &overlay);
    assert_eq!(check["check-errors"], 0, "{check}");
    assert!(
        check.get("corruptions").is_none_or(|c| c == 0)
            && check.get("leaks").is_none_or(|c| c == 0),
        "{check}"
    );
    // The overlay reads as the master through qemu's own block layer.
    let back = dir.join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&overlay)
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&raw).unwrap(),
        "an empty overlay shows the master"
    );
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&overlay).unwrap().blocks() * 512;
    assert!(
        on_disk <= 64 << 10,
        "an empty overlay costs {on_disk} bytes on disk"
    );

    // Bad disks, each refused with nothing stored.
    let count = engine.store.images().unwrap().len();
    let backed = dir.join("backed.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&q)
        .arg(&backed));
    let e = engine.import_image(&backed, None).unwrap_err().to_string();
    assert!(e.contains("has a backing file of its own"), "{e}");
    let bytes = std::fs::read(&q).unwrap();
    let cut = dir.join("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = engine.import_image(&cut, None).unwrap_err().to_string();
    assert!(e.contains("the file is truncated"), "{e}");
    std::fs::write(dir.join("header.qcow2"), &bytes[..40]).unwrap();
    let e = engine
        .import_image(&dir.join("header.qcow2"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("claims to be qcow2 but is") || e.contains("no qcow2 header"),
        "{e}"
    );
    // Files that are not what they claim, by name or by --format.
    let fake = dir.join("fake.qcow2");
    tar_of(&tree(&dir.join("t")), &fake);
    let e = engine.import_image(&fake, None).unwrap_err().to_string();
    assert!(e.contains("claims to be qcow2 but is tar"), "{e}");
    let e = engine
        .import_image_reporting(&q, None, Some(SourceFormat::Raw), &mint_core::quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("claims to be raw but is qcow2"), "{e}");
    std::fs::write(dir.join("notes.txt"), "not an image\n").unwrap();
    let e = engine
        .import_image(&dir.join("notes.txt"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a format mint imports"), "{e}");
    assert_eq!(engine.store.images().unwrap().len(), count);
}

/// What cloud-init itself (Debian's package, installed by `cargo xtask setup`) makes of a
/// seed's three files: it parses the meta-data, turns the network-config into its network
/// state, and validates the user-data against its cloud-config schema.
const CLOUD_INIT_CHECK: &str = r##"
import json, sys
from cloudinit import util
from cloudinit.net import network_state
from cloudinit.config import schema
d = sys.argv[1]
read = lambda n: open(d + "/" + n).read()
meta = util.load_yaml(read("meta-data"))
ns = network_state.parse_net_config_data(util.load_yaml(read("network-config")), skip_broken=False)
ud = read("user-data")
assert ud.startswith("#cloud-config\n"), "user-data header"
cfg = util.load_yaml(ud)
schema.validate_cloudconfig_schema(cfg, strict=True)
ifaces = [{"subnets": i.get("subnets", [])} for i in ns.iter_interfaces()]
print(json.dumps({"meta": meta, "ifaces": ifaces, "dns": ns.dns_nameservers, "hostname": cfg.get("hostname"),
                  "files": [f["path"] for f in cfg.get("write_files", [])], "packages": cfg.get("packages"),
                  "runcmd": cfg.get("runcmd"), "keys": cfg.get("ssh_authorized_keys")}, default=str))
"##;

#[test]
fn instances_of_a_disk_master_are_one_shared_overlay_and_their_own_seed() {
    let dir = scratch("images-disk-tier");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 8);
    let q = dir.join("cloud.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    let image = engine.import_image(&q, None).unwrap();
    let spec: mint_core::TierSpec = serde_json::from_value(serde_json::json!({
        "name": "vm", "image": image.digest, "max-instances": 3, "subnet": "198.18.4.0/24",
        "gateway": "198.18.4.1", "dns": ["198.18.4.53"], "hostname": "vm-{index}",
        "customizers": [{"plugin": "hostname", "config": {"domain": "mint.test"}}], "driver": {"plugin": "noop"},
    }))
    .unwrap();
    crate::support::block_on(engine.create_tier(&spec, "admin:test")).unwrap();
    let inst = engine.store.instances("vm").unwrap();
    let parts: Vec<_> = inst
        .iter()
        .map(|i| i.disk.clone().expect("disk parts"))
        .collect();
    assert!(
        parts.iter().all(|p| p.overlay == parts[0].overlay),
        "one overlay for every instance"
    );
    assert!(
        parts[0].seed != parts[1].seed && parts[1].seed != parts[2].seed,
        "a seed of its own each"
    );

    let overlay = engine
        .images
        .locate(parts[0].overlay.as_deref().unwrap())
        .unwrap();
    let info = qemu_img_json(&["info"], &overlay);
    assert_eq!(
        info["backing-filename"],
        engine
            .images
            .disk(&image.digest, "qcow2")
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert_eq!(qemu_img_json(&["check"], &overlay)["check-errors"], 0);

    // What a node fetches: the master under the name the overlay expects, the overlay, the seed.
    let a = engine.artifact("vm", 2).unwrap();
    assert_eq!(a.format, "disk");
    let roles: Vec<(&str, &str)> = a
        .parts
        .iter()
        .map(|p| (p.role, p.digest.as_str()))
        .collect();
    assert_eq!(
        roles,
        [
            ("master", image.digest.as_str()),
            ("overlay", parts[2].overlay.as_deref().unwrap()),
            ("seed", parts[2].seed.as_str())
        ]
    );
    assert_eq!(
        serde_json::Value::from(a.parts[0].name.as_str()),
        info["backing-filename"]
    );

    let seed = engine.images.locate(&parts[2].seed).unwrap();
    let blkid = run(Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&seed));
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(
        blkid.contains("LABEL=cidata") && blkid.contains("TYPE=vfat"),
        "{blkid}"
    );
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&seed).unwrap().blocks() * 512;
    assert!(on_disk <= 64 << 10, "a seed costs {on_disk} bytes on disk");

    // Read the files back with mtools, an independent FAT reader, and hand them to cloud-init.
    let files = dir.join("seed-files");
    std::fs::create_dir_all(&files).unwrap();
    for name in ["meta-data", "network-config", "user-data"] {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&seed)
            .arg(format!("::{name}"))
            .arg(files.join(name)));
    }
    let o = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(CLOUD_INIT_CHECK)
        .arg(&files));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["meta"]["local-hostname"], "vm-2");
    assert!(
        v["meta"]["instance-id"]
            .as_str()
            .unwrap()
            .starts_with("mint-vm-2-")
    );
    assert_eq!(v["hostname"], "vm-2");
    assert_eq!(
        v["ifaces"][0]["subnets"][0]["address"],
        inst[2].address.to_string()
    );
    let routes = &v["ifaces"][0]["subnets"][0]["routes"][0];
    assert_eq!(
        (&routes["gateway"], &routes["network"], &routes["prefix"]),
        (&"198.18.4.1".into(), &"0.0.0.0".into(), &0.into()),
        "{}",
        v["ifaces"]
    );
    assert!(v["dns"].to_string().contains("198.18.4.53"), "{}", v["dns"]);
    assert!(
        v["files"].to_string().contains("/etc/hostname"),
        "the customizers' edits travel as write_files: {}",
        v["files"]
    );
}

/// A small ISO built with xorriso: bootable (isolinux's El Torito image, hybrid MBR) or not.
fn iso(dir: &Path, name: &str, bootable: bool) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    std::fs::create_dir_all(tree.join("isolinux")).unwrap();
    std::fs::write(tree.join("hello.txt"), "hello\n").unwrap();
    let out = dir.join(format!("{name}.iso"));
    let mut cmd = Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-quiet", "-volid", "MINT_TEST", "-o"])
        .arg(&out);
    if bootable {
        std::fs::copy(
            "/usr/lib/ISOLINUX/isolinux.bin",
            tree.join("isolinux/isolinux.bin"),
        )
        .unwrap();
        cmd.args([
            "-isohybrid-mbr",
            "/usr/lib/ISOLINUX/isohdpfx.bin",
            "-c",
            "isolinux/boot.cat",
            "-b",
            "isolinux/isolinux.bin",
        ]);
        cmd.args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"]);
    }
    run(cmd.arg(&tree));
    out
}

#[test]
fn an_iso_master_is_booted_as_it_is_with_a_seed_each_that_fits_a_floppy() {
    let dir = scratch("images-iso-tier");
    let engine = Engine::open(&dir.join("data")).unwrap();
    // A hybrid ISO carries an MBR too: it is still an ISO, booted as a CD.
    let image = engine.import_image(&iso(&dir, "live", true), None).unwrap();
    assert_eq!(
        (image.format.as_str(), image.source.as_str()),
        ("iso", "iso")
    );
    let plain = engine
        .import_image(&iso(&dir, "plain", false), None)
        .unwrap_err()
        .to_string();
    assert!(
        plain.contains("no El Torito boot record") && plain.contains("xorriso"),
        "{plain}"
    );

    let spec: mint_core::TierSpec = serde_json::from_value(serde_json::json!({
        "name": "live", "image": image.digest, "max-instances": 2, "subnet": "198.18.4.0/24",
        "hostname": "live-{index}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "noop"},
    }))
    .unwrap();
    crate::support::block_on(engine.create_tier(&spec, "admin:test")).unwrap();
    let a = engine.artifact("live", 1).unwrap();
    assert_eq!(a.format, "iso");
    let roles: Vec<&str> = a.parts.iter().map(|p| p.role).collect();
    assert_eq!(
        roles,
        ["master", "seed"],
        "no overlay: a CD boots read-only"
    );
    assert_eq!(a.parts[0].digest, image.digest);
    assert!(a.parts[0].name.ends_with(".iso"));
    let seed = engine.images.locate(&a.parts[1].digest).unwrap();
    assert_eq!(
        std::fs::metadata(&seed).unwrap().len(),
        mint_core::images::seed::FLOPPY_BYTES,
        "a floppy's size"
    );
    let files = dir.join("seed-files");
    std::fs::create_dir_all(&files).unwrap();
    for f in ["meta-data", "network-config", "user-data"] {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&seed)
            .arg(format!("::{f}"))
            .arg(files.join(f))
            .env("MTOOLS_SKIP_CHECK", "1"));
    }
    let v = cloud_init(&files);
    assert_eq!(v["hostname"], "live-1");
    assert!(
        engine
            .materialize("live", 1, &dir.join("root"))
            .unwrap_err()
            .to_string()
            .contains("iso master")
    );
}

#[test]
fn tree_instances_are_the_shared_master_and_a_small_layer() {
    use mint_core::images::materialize::OverlayEdit;
    use mint_layers::Whiteouts;
    let dir = scratch("images-layers");
    let root = tree(&dir);
    std::fs::write(root.join("usr/share/doc/big"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(root.join("etc/old.conf"), "old\n").unwrap();
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image = engine.import_image(&root, None).unwrap();
    assert!(
        !engine
            .images
            .dir()
            .join(image.digest.trim_start_matches("sha256:"))
            .exists(),
        "no unpacked copy of the master is kept"
    );
    let spec: mint_core::TierSpec = serde_json::from_value(serde_json::json!({
        "name": "web", "image": image.digest, "max-instances": 4, "subnet": "198.18.5.0/24", "gateway": "198.18.5.1",
        "hostname": "web-{index:02}", "driver": {"plugin": "noop"},
    }))
    .unwrap();
    crate::support::block_on(engine.create_tier(&spec, "admin:test")).unwrap();

    // The descriptor: the master's own tar, the same for every instance, and a layer of a
    // few KiB per instance, minted with it.
    let a = engine.artifact("web", 3).unwrap();
    let b = engine.artifact("web", 1).unwrap();
    let roles: Vec<&str> = a.parts.iter().map(|p| p.role).collect();
    assert_eq!(roles, ["master", "layer"]);
    assert_eq!(a.parts[0].digest, image.digest);
    assert_eq!(a.parts[0].digest, b.parts[0].digest);
    assert_ne!(a.parts[1].digest, b.parts[1].digest);
    assert!(
        a.parts[1].size < 16 << 10,
        "a layer is its edits plus headers: {} bytes",
        a.parts[1].size
    );
    let instances = engine.store.instances("web").unwrap();
    assert_eq!(
        instances[3].layer.as_deref(),
        Some(a.parts[1].digest.as_str()),
        "built when minted, not when asked"
    );

    // Materialized: the master's files with the layer over them.
    let into = dir.join("web-03");
    let m = engine.materialize("web", 3, &into).unwrap();
    assert_eq!(m.edits > 0, true, "{m:?}");
    assert_eq!(
        std::fs::read_to_string(into.join("etc/hostname")).unwrap(),
        "web-03\n"
    );
    assert!(
        std::fs::read_to_string(into.join("etc/network/interfaces"))
            .unwrap()
            .contains("198.18.5.5/24")
    );
    assert_eq!(
        std::fs::read_link(into.join("etc/name-link")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        std::fs::metadata(into.join("usr/share/doc/big"))
            .unwrap()
            .len(),
        1 << 20
    );
    let e = engine.materialize("web", 3, &into).unwrap_err().to_string();
    assert!(
        e.contains("exists; materialize into a new directory"),
        "{e}"
    );

    // A layer over the master, by edits: writes through the master's symlinks land in the
    // real directory inside the image, removals become whiteouts, and applied over the
    // master (as a node without overlayfs does) they give the same tree.
    let victim = dir.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    let linked = dir.join("linked");
    std::fs::create_dir_all(linked.join("real")).unwrap();
    std::fs::write(linked.join("real/keep"), "k").unwrap();
    std::fs::write(linked.join("gone"), "g").unwrap();
    std::os::unix::fs::symlink(&victim, linked.join("out")).unwrap();
    std::os::unix::fs::symlink("../../..", linked.join("up")).unwrap();
    std::os::unix::fs::symlink("/real", linked.join("via")).unwrap();
    let master = engine.import_image(&linked, Some("linked")).unwrap();
    let index = engine.tree_index(&master.digest).unwrap();
    let edits = [
        OverlayEdit::Write {
            path: "/out/pwned".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            contents: "eA==".into(),
        },
        OverlayEdit::Write {
            path: "/up/escaped".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            contents: "eA==".into(),
        },
        OverlayEdit::Write {
            path: "/via/new".into(),
            mode: 0o600,
            uid: 0,
            gid: 0,
            contents: "eA==".into(),
        },
        OverlayEdit::Remove {
            path: "/gone".into(),
        },
    ];
    let layer = mint_core::images::layer::build(&index, &edits).unwrap();
    let names: Vec<String> = tar::Archive::new(&layer[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.contains(&".wh.gone".to_string()) && names.contains(&"real/new".to_string()),
        "{names:?}"
    );
    let victim_in_image = victim
        .strip_prefix("/")
        .unwrap()
        .join("pwned")
        .display()
        .to_string();
    assert!(
        names.contains(&"escaped".to_string()) && names.contains(&victim_in_image),
        "{names:?}"
    );
    // Applied over links to the master's files, as a node without overlayfs builds a root.
    let dest = dir.join("linked-instance");
    mint_layers::share::share_tree(&linked, &dest).unwrap();
    mint_layers::unpack(&layer[..], &dest, Whiteouts::Apply).unwrap();
    assert!(
        !victim.join("pwned").exists() && !dir.join("escaped").exists(),
        "nothing is written outside the root"
    );
    assert!(
        dest.join(victim.strip_prefix("/").unwrap())
            .join("pwned")
            .exists()
    );
    assert!(dest.join("escaped").exists(), "`..` stops at the new root");
    assert_eq!(std::fs::read_to_string(dest.join("real/new")).unwrap(), "x");
    assert!(!dest.join("gone").exists() && dest.join("real/keep").exists());
}

#[test]
fn masters_keep_modes_owners_and_special_files() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let dir = scratch("images-special");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("usr/bin/su"), "su").unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/su"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(root.join("etc-shadow"), "s").unwrap();
    std::os::unix::fs::lchown(root.join("etc-shadow"), Some(0), Some(42)).ok();
    let mk = |p: &str, kind: libc::mode_t, dev: libc::dev_t| {
        let c = std::ffi::CString::new(root.join(p).to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that lives for the call.
        unsafe { libc::mknod(c.as_ptr(), kind | 0o660, dev) == 0 }
    };
    let devices = mk("dev/sda", libc::S_IFBLK, libc::makedev(8, 0))
        && mk("dev/null", libc::S_IFCHR, libc::makedev(1, 3));
    assert!(mk("dev/fifo", libc::S_IFIFO, 0));
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image = engine.import_image(&root, None).unwrap();
    // Unpacked from its tar: modes, owners and special files as they were.
    let again = dir.join("again");
    mint_core::images::archive::unpack_checked(&engine.images.tar(&image.digest), &again).unwrap();
    let meta = |p: &str| std::fs::symlink_metadata(again.join(p)).unwrap();
    assert_eq!(
        meta("usr/bin/su").mode() & 0o7777,
        0o4755,
        "setuid survives"
    );
    assert_eq!(meta("tmp").mode() & 0o7777, 0o1777, "sticky survives");
    assert!(
        meta("dev/fifo").file_type().is_fifo(),
        "a FIFO stays a FIFO"
    );
    if devices {
        assert!(
            meta("dev/sda").file_type().is_block_device(),
            "a block device stays one, not an empty file"
        );
        assert_eq!(meta("dev/sda").rdev(), libc::makedev(8, 0));
        assert!(meta("dev/null").file_type().is_char_device());
        assert_eq!(meta("etc-shadow").gid(), 42, "owners survive");
    }
    assert_eq!(
        engine.import_image(&again, Some("dir")).unwrap().digest,
        image.digest,
        "the same tree gives the same master"
    );
}

#[test]
fn collection_removes_what_no_tier_uses_and_keeps_what_one_does() {
    let dir = scratch("images-gc");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let tree_image = engine.import_image(&tree(&dir), Some("tree")).unwrap();
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 4);
    let disk_image = engine.import_image(&raw, Some("disk")).unwrap();
    let unused = engine
        .import_image(&tree(&dir.join("other")).join("etc"), Some("unused"))
        .unwrap();
    let spec = |name: &str,
                image: &str,
                subnet: &str,
                customizers: serde_json::Value|
     -> mint_core::TierSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "image": image, "max-instances": 3, "subnet": subnet, "hostname": format!("{name}-{{index}}"),
            "customizers": customizers, "driver": {"plugin": "noop"},
        }))
        .unwrap()
    };
    let hostname = serde_json::json!([{"plugin": "hostname"}]);
    crate::support::block_on(engine.create_tier(
        &spec("web", &tree_image.digest, "198.18.6.0/24", hostname.clone()),
        "admin:test",
    ))
    .unwrap();
    crate::support::block_on(engine.create_tier(
        &spec("vm", &disk_image.digest, "198.18.7.0/24", hostname),
        "admin:test",
    ))
    .unwrap();
    let layer = engine.artifact("web", 0).unwrap().parts[1].digest.clone();
    let seeds: Vec<String> = engine
        .store
        .instances("vm")
        .unwrap()
        .iter()
        .map(|i| i.disk.as_ref().unwrap().seed.clone())
        .collect();

    let e = engine
        .delete_image("tree", "admin:test")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is the master of tier(s) web"), "{e}");
    std::fs::create_dir_all(engine.images.dir().join(".import-999-0/tree")).unwrap();
    let r = engine.gc(true, "admin:test").unwrap();
    assert_eq!(
        (r.masters.len(), r.blobs, r.overlays, r.staging),
        (0, 0, 0, 1),
        "{r:?}"
    );
    assert!(
        engine.store.image(&unused.digest).is_ok(),
        "kept: --keep-masters"
    );

    engine.store.delete_tier("vm", "admin:test").unwrap();
    let r = engine.gc(false, "admin:test").unwrap();
    let mut masters = r.masters.clone();
    masters.sort();
    let mut expected = vec![disk_image.digest.clone(), unused.digest.clone()];
    expected.sort();
    assert_eq!(masters, expected, "the masters no tier uses");
    assert_eq!(r.blobs, 4, "three seeds and the shared overlay: {r:?}");
    assert_eq!(r.overlays, 3, "the deleted tier's customization overlays");
    assert!(r.bytes_freed >= 4 << 20, "{r:?}");
    assert!(seeds.iter().all(|s| engine.images.locate(s).is_none()));
    assert!(
        !engine.images.disk(&disk_image.digest, "raw").exists()
            && engine.store.image(&disk_image.digest).is_err()
    );

    // What a live tier uses is all still there and still works.
    assert!(engine.images.locate(&layer).is_some());
    assert_eq!(engine.artifact("web", 0).unwrap().parts[1].digest, layer);
    engine.materialize("web", 1, &dir.join("web-1")).unwrap();
    assert_eq!(
        engine.gc(false, "admin:test").unwrap().blobs,
        0,
        "a second collection finds nothing"
    );
    assert_eq!(
        engine.store.check_invariants().unwrap(),
        Vec::<String>::new()
    );
    let e = engine
        .delete_image("nosuch", "admin:test")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no image with digest or name `nosuch`"), "{e}");
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@site";

fn all_customizers() -> serde_json::Value {
    serde_json::json!([
        {"plugin": "hostname"},
        {"plugin": "hosts", "config": {"domain": "mint.test"}},
        {"plugin": "ssh-keys", "config": {"keys": [KEY]}},
        {"plugin": "files", "config": {"files": [{"path": "/etc/motd", "template": "{hostname} of {tier} at {address}\n"}]}},
        {"plugin": "cloud-init", "config": {"user-data": {"packages": ["nginx"]}}},
    ])
}

/// cloud-init's verdict on the three seed files in `dir`.
fn cloud_init(dir: &Path) -> serde_json::Value {
    let o = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(CLOUD_INIT_CHECK)
        .arg(dir));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_customizer_works_on_tree_and_disk_masters() {
    let dir = scratch("images-customizers");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let tree_image = engine.import_image(&tree(&dir), None).unwrap();
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 4);
    let disk_image = engine.import_image(&raw, None).unwrap();
    let spec = |name: &str, image: &str, subnet: &str| -> mint_core::TierSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "image": image, "max-instances": 4, "subnet": subnet, "gateway": subnet.replace(".0/24", ".1"),
            "hostname": format!("{name}-{{index}}"), "customizers": all_customizers(), "driver": {"plugin": "noop"},
        }))
        .unwrap()
    };
    crate::support::block_on(engine.create_tier(
        &spec("web", &tree_image.digest, "198.18.8.0/24"),
        "admin:test",
    ))
    .unwrap();
    crate::support::block_on(engine.create_tier(
        &spec("vm", &disk_image.digest, "198.18.9.0/24"),
        "admin:test",
    ))
    .unwrap();

    // A tree instance: every file in place, the seed where cloud-init looks for a local one.
    let root = dir.join("web-2");
    engine.materialize("web", 2, &root).unwrap();
    let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
    for i in 0..4 {
        assert!(
            hosts.contains(&format!("198.18.8.{}\tweb-{i}.mint.test web-{i}\n", i + 2)),
            "all K peers: {hosts}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
        format!("{KEY}\n")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(root.join("root/.ssh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/motd")).unwrap(),
        "web-2 of web at 198.18.8.4\n"
    );
    let v = cloud_init(&root.join("var/lib/cloud/seed/nocloud"));
    assert_eq!(
        (v["hostname"].as_str(), v["packages"][0].as_str()),
        (Some("web-2"), Some("nginx"))
    );
    assert_eq!(v["ifaces"][0]["subnets"][0]["address"], "198.18.8.4");

    // A disk instance: the same customization travels in its cidata volume.
    let seed = engine
        .images
        .locate(
            &engine.store.instances("vm").unwrap()[1]
                .disk
                .as_ref()
                .unwrap()
                .seed,
        )
        .unwrap();
    let files = dir.join("vm-1-seed");
    std::fs::create_dir_all(&files).unwrap();
    for name in ["meta-data", "network-config", "user-data"] {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&seed)
            .arg(format!("::{name}"))
            .arg(files.join(name)));
    }
    let v = cloud_init(&files);
    assert_eq!(
        (v["hostname"].as_str(), v["packages"][0].as_str()),
        (Some("vm-1"), Some("nginx")),
        "{v}"
    );
    let written = v["files"].to_string();
    for f in ["/etc/hosts", "/etc/motd", "/root/.ssh/authorized_keys"] {
        assert!(written.contains(f), "{f} travels as write_files: {written}");
    }
    assert!(
        !written.contains("/var/lib/cloud/seed"),
        "the seed itself is the volume, not a file in it"
    );
    assert!(
        v["runcmd"].to_string().contains("/root/.ssh"),
        "the .ssh directory is made first: {}",
        v["runcmd"]
    );
    assert_eq!(v["ifaces"][0]["subnets"][0]["address"], "198.18.9.3");
}

/// A tar written byte by byte, so that it can hold what well-behaved tools refuse to write.
fn raw_tar(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = *kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn archives_that_reach_outside_their_root_are_refused() {
    let dir = scratch("images-escape");
    let engine = Engine::open(&dir.join("data")).unwrap();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "dotdot.tar",
            raw_tar(&[("../evil", b'0', "", b"x")]),
            "climbs out with `..`",
        ),
        (
            "absolute.tar",
            raw_tar(&[("/etc/evil", b'0', "", b"x")]),
            "is absolute",
        ),
        (
            "symlink.tar",
            raw_tar(&[
                ("etc/", b'5', "", b""),
                ("etc/link", b'2', "../../outside", b""),
            ]),
            "escapes the root",
        ),
        (
            "hardlink.tar",
            raw_tar(&[("hard", b'1', "../../etc/shadow", b"")]),
            "escapes the root",
        ),
        (
            "hardabs.tar",
            raw_tar(&[("hard", b'1', "/etc/shadow", b"")]),
            "hard link `hard` has an absolute target",
        ),
    ];
    for (name, bytes, needle) in cases {
        std::fs::write(dir.join(name), &bytes).unwrap();
        let e = engine
            .import_image(&dir.join(name), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{name}: {needle} not in {e}");
        // The same archive gzipped is refused the same way.
        run(Command::new("gzip").arg("-f").arg("-k").arg(dir.join(name)));
        let gz = dir.join(format!("{name}.gz"));
        let e = engine.import_image(&gz, None).unwrap_err().to_string();
        assert!(e.contains(needle), "{name}.gz: {needle} not in {e}");
    }
    assert!(engine.store.images().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(engine.images.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "nothing is left behind: {left:?}");
}
