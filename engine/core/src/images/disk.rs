//! Disk masters: raw and qcow2 images (cloud images), and bootable ISO images, checked
//! natively before they are stored, and the qcow2 overlays that make an instance of a disk
//! without copying it.
//!
//! An overlay written here is the smallest valid qcow2 v3 file with the master as its
//! backing file: a header cluster, a refcount table, one refcount block and an all-zero L1
//! table, written sparsely, so an instance costs a few kilobytes on disk until it runs.

use super::{ImageError, io};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// The header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Offsets in qcow2 tables are bits 9..55 of an entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether the first bytes are a qcow2 header.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.len() >= 4 && be32(head, 0) == QCOW2_MAGIC
}

/// Whether a file looks like a raw disk: a whole number of sectors beginning with an MBR
/// or GPT partition table, or an ext2/3/4 file system.
pub fn is_raw_disk(head: &[u8], len: u64) -> bool {
    if len < 2048 || len % 512 != 0 || head.len() < 1082 {
        return false;
    }
    let mbr = head[510] == 0x55 && head[511] == 0xaa;
    let gpt = &head[512..520] == b"EFI PART";
    let ext = head[1080] == 0x53 && head[1081] == 0xef;
    mbr || gpt || ext
}

/// ISO 9660 volume descriptors begin at sector 16 of 2048 bytes.
const ISO_DESCRIPTORS: u64 = 16 * 2048;

/// Whether `f` holds an ISO 9660 file system (its first volume descriptor is at 32 KiB).
/// Reads from the start of the file; leaves the position anywhere.
pub fn is_iso9660(f: &mut std::fs::File) -> std::io::Result<bool> {
    let mut d = [0u8; 6];
    f.seek(SeekFrom::Start(ISO_DESCRIPTORS))?;
    match f.read_exact(&mut d) {
        Ok(()) => Ok(&d[1..6] == b"CD001"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Checks an ISO master: a primary volume descriptor whose volume fits in the file, and
/// an El Torito boot record (without one no machine boots it from a CD). Returns the size
/// a machine sees: the file's.
pub fn check_iso(path: &Path) -> Result<u64, ImageError> {
    let bad = |m: String| {
        ImageError::Invalid(format!(
            "{} is not a bootable ISO image: {m}",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let len = f.metadata().map_err(io("cannot stat"))?.len();
    let (mut primary, mut boot) = (None, false);
    for i in 0..64u64 {
        let mut d = vec![0u8; 2048];
        f.seek(SeekFrom::Start(ISO_DESCRIPTORS + i * 2048))
            .map_err(io("cannot seek"))?;
        if f.read_exact(&mut d).is_err() || &d[1..6] != b"CD001" {
            return Err(bad(format!(
                "volume descriptor {i} is missing or damaged (the file may be cut short)"
            )));
        }
        match d[0] {
            0 if d[7..30] == *b"EL TORITO SPECIFICATION" => boot = true,
            1 => {
                let blocks = u64::from(u32::from_le_bytes(d[80..84].try_into().expect("4 bytes")));
                let block = u64::from(u16::from_le_bytes(d[128..130].try_into().expect("2 bytes")));
                primary = Some(blocks * block);
            }
            255 => break,
            _ => {}
        }
    }
    let Some(volume) = primary else {
        return Err(bad("it has no primary volume descriptor".into()));
    };
    if volume > len {
        return Err(bad(format!(
            "its volume is {volume} bytes but the file holds {len}: it was cut short; copy it again"
        )));
    }
    if !boot {
        return Err(bad("it has no El Torito boot record, so no machine boots it from a CD; build it with a boot image (xorriso -as mkisofs -b ...)".into()));
    }
    Ok(len)
}

/// What a qcow2 header says, once checked.
#[derive(Debug, Clone, Copy)]
pub struct Qcow2Info {
    /// The disk's size as a guest sees it.
    pub virtual_size: u64,
    /// 2 or 3.
    pub version: u32,
}

fn bad(path: &Path, message: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(format!(
        "{} is not a usable qcow2 image: {message}",
        path.display()
    ))
}

/// Checks a qcow2 master: a version mint understands, no backing file of its own (a master
/// must be whole), not encrypted, dirty or corrupt, and every table and data cluster its
/// L1 and L2 tables point at inside the file (a truncated copy is refused).
pub fn check_qcow2(path: &Path) -> Result<Qcow2Info, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let len = f.metadata().map_err(io("cannot stat"))?.len();
    let mut h = vec![0u8; 104];
    let got = read_at(&mut f, 0, &mut h)?;
    if got < 72 || !is_qcow2(&h) {
        return Err(bad(path, "no qcow2 header (truncated, or another format)"));
    }
    let version = be32(&h, 4);
    if !(version == 2 || version == 3) || (version == 3 && got < 104) {
        return Err(bad(
            path,
            format!("qcow2 version {version} (mint reads versions 2 and 3)"),
        ));
    }
    if be64(&h, 8) != 0 {
        let (off, size) = (be64(&h, 8), be32(&h, 16) as usize);
        let mut name = vec![0u8; size.min(1023)];
        read_at(&mut f, off, &mut name)?;
        return Err(bad(
            path,
            format!(
                "it has a backing file of its own (`{}`); a master must stand alone: flatten it with `qemu-img convert -O qcow2 {} master.qcow2`",
                String::from_utf8_lossy(&name),
                path.display()
            ),
        ));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(
            path,
            format!("cluster_bits {cluster_bits} is outside 9..=21"),
        ));
    }
    if be32(&h, 32) != 0 {
        return Err(bad(
            path,
            "it is encrypted; decrypt it first (qemu-img convert)",
        ));
    }
    let mut l2_entry = 8u64;
    if version == 3 {
        let incompatible = be64(&h, 72);
        if incompatible & 1 != 0 {
            return Err(bad(
                path,
                "it is marked dirty; repair it with `qemu-img check -r all`",
            ));
        }
        if incompatible & 2 != 0 {
            return Err(bad(path, "it is marked corrupt"));
        }
        if incompatible & 4 != 0 {
            return Err(bad(path, "its data lives in an external file"));
        }
        if incompatible & !0b11111 != 0 {
            return Err(bad(
                path,
                format!("it uses incompatible features mint does not know ({incompatible:#x})"),
            ));
        }
        if incompatible & 16 != 0 {
            l2_entry = 16;
        }
    }
    let cluster = 1u64 << cluster_bits;
    let virtual_size = be64(&h, 24);
    let l1_size = u64::from(be32(&h, 36));
    let l1_offset = be64(&h, 40);
    let inside = |off: u64, bytes: u64, what: &str| -> Result<(), ImageError> {
        match off.checked_add(bytes) {
            Some(end) if end <= len => Ok(()),
            _ => Err(bad(
                path,
                format!(
                    "{what} at offset {off} lies beyond the end of the file ({len} bytes): the file is truncated"
                ),
            )),
        }
    };
    let refcount_offset = be64(&h, 48);
    inside(
        refcount_offset,
        u64::from(be32(&h, 56)).saturating_mul(cluster),
        "the refcount table",
    )?;
    if l1_size > (1 << 26) {
        return Err(bad(path, format!("an L1 table of {l1_size} entries")));
    }
    inside(l1_offset, l1_size * 8, "the L1 table")?;
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    read_at(&mut f, l1_offset, &mut l1)?;
    let mut l2 = vec![0u8; cluster as usize];
    // Compressed clusters keep their offset in the low 62 - (cluster_bits - 8) bits.
    let compressed_mask = (1u64 << (62 - (cluster_bits - 8))) - 1;
    for e in l1.chunks_exact(8) {
        let l2_offset = u64::from_be_bytes(e.try_into().expect("8")) & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        inside(l2_offset, cluster, "an L2 table")?;
        read_at(&mut f, l2_offset, &mut l2)?;
        for d in l2.chunks_exact(l2_entry as usize) {
            let d = u64::from_be_bytes(d[..8].try_into().expect("8"));
            let data = if d & COMPRESSED != 0 {
                d & compressed_mask
            } else {
                d & OFFSET_MASK
            };
            if data != 0 {
                inside(data, 1, "a data cluster")?;
            }
        }
    }
    Ok(Qcow2Info {
        virtual_size,
        version,
    })
}

fn read_at(f: &mut std::fs::File, at: u64, buf: &mut [u8]) -> Result<usize, ImageError> {
    f.seek(SeekFrom::Start(at)).map_err(io("cannot seek"))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(io("cannot read"))? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes an empty qcow2 v3 overlay of `virtual_size` bytes whose backing file is
/// `backing` (a name relative to the overlay's directory) of format `backing_format`
/// (`raw` or `qcow2`). Only the non-zero bytes are written; the rest is a hole.
pub fn write_overlay(
    out: &Path,
    backing: &str,
    backing_format: &str,
    virtual_size: u64,
) -> Result<(), ImageError> {
    const CLUSTER_BITS: u32 = 16;
    const CLUSTER: u64 = 1 << CLUSTER_BITS;
    // One L2 table maps CLUSTER / 8 clusters.
    let per_l2 = (CLUSTER / 8) * CLUSTER;
    let l1_size = virtual_size.div_ceil(per_l2).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
    // Clusters: 0 header, 1 refcount table, 2 refcount block, 3.. L1 table.
    let clusters = 3 + l1_clusters;
    // One refcount block of 16-bit counts covers CLUSTER / 2 clusters.
    if clusters > CLUSTER / 2 {
        return Err(ImageError::Invalid(format!(
            "a disk of {virtual_size} bytes is too large for mint's overlays"
        )));
    }
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(&QCOW2_MAGIC.to_be_bytes());
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset, set below
    h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&virtual_size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&(3 * CLUSTER).to_be_bytes()); // L1 table
    h.extend_from_slice(&CLUSTER.to_be_bytes()); // refcount table
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit counts
    h.extend_from_slice(&104u32.to_be_bytes()); // header length
    debug_assert_eq!(h.len(), 104);
    // Header extensions: the backing format, then the end marker.
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&(backing_format.len() as u32).to_be_bytes());
    h.extend_from_slice(backing_format.as_bytes());
    h.resize(h.len().next_multiple_of(8), 0);
    h.extend_from_slice(&[0u8; 8]);
    let backing_offset = h.len() as u64;
    h.extend_from_slice(backing.as_bytes());
    if h.len() as u64 > CLUSTER {
        return Err(ImageError::Invalid(format!(
            "backing file name `{backing}` is too long"
        )));
    }
    h[8..16].copy_from_slice(&backing_offset.to_be_bytes());

    let mut f =
        std::fs::File::create(out).map_err(io(format!("cannot write {}", out.display())))?;
    let write = |f: &mut std::fs::File, at: u64, bytes: &[u8]| -> Result<(), ImageError> {
        f.seek(SeekFrom::Start(at)).map_err(io("cannot seek"))?;
        f.write_all(bytes)
            .map_err(io(format!("cannot write {}", out.display())))
    };
    write(&mut f, 0, &h)?;
    write(&mut f, CLUSTER, &(2 * CLUSTER).to_be_bytes())?;
    let refcounts: Vec<u8> = (0..clusters).flat_map(|_| 1u16.to_be_bytes()).collect();
    write(&mut f, 2 * CLUSTER, &refcounts)?;
    f.set_len(clusters * CLUSTER)
        .map_err(io("cannot size the overlay"))?;
    f.sync_all().map_err(io("cannot sync the overlay"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ISO 9660 image of `blocks` 2048-byte blocks with the descriptors given (their
    /// types; a boot record gets El Torito's identifier), cut to `len` bytes.
    fn iso(name: &str, descriptors: &[u8], blocks: u32, len: usize) -> std::path::PathBuf {
        let mut img = vec![0u8; len.max(ISO_DESCRIPTORS as usize + 2048 * (descriptors.len() + 1))];
        for (i, kind) in descriptors.iter().chain([&255u8]).enumerate() {
            let d = &mut img[ISO_DESCRIPTORS as usize + i * 2048..][..2048];
            d[0] = *kind;
            d[1..6].copy_from_slice(b"CD001");
            d[6] = 1;
            if *kind == 0 {
                d[7..30].copy_from_slice(b"EL TORITO SPECIFICATION");
            }
            if *kind == 1 {
                d[80..84].copy_from_slice(&blocks.to_le_bytes());
                d[128..130].copy_from_slice(&2048u16.to_le_bytes());
            }
        }
        img.truncate(len);
        let path = std::env::temp_dir().join(format!("mint-iso-{}-{name}.iso", std::process::id()));
        std::fs::write(&path, img).unwrap();
        path
    }

    #[test]
    fn bootable_isos_are_taken_and_others_refused_saying_why() {
        let good = iso("good", &[1, 0], 40, 40 * 2048);
        assert!(is_iso9660(&mut std::fs::File::open(&good).unwrap()).unwrap());
        assert_eq!(check_iso(&good).unwrap(), 40 * 2048);

        let plain = iso("plain", &[1], 40, 40 * 2048);
        assert!(
            check_iso(&plain)
                .unwrap_err()
                .to_string()
                .contains("no El Torito boot record")
        );
        let cut = iso("cut", &[1, 0], 400, 40 * 2048);
        assert!(
            check_iso(&cut)
                .unwrap_err()
                .to_string()
                .contains("cut short")
        );

        let not = std::env::temp_dir().join(format!("mint-not-iso-{}", std::process::id()));
        std::fs::write(&not, vec![0u8; 100]).unwrap();
        assert!(!is_iso9660(&mut std::fs::File::open(&not).unwrap()).unwrap());
        for p in [good, plain, cut, not] {
            let _ = std::fs::remove_file(p);
        }
    }
}
