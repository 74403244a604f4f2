//! An instance's overlay: its customizers' edits in a canonical JSON form, addressed by
//! the sha256 of that form so identical overlays are stored once.

use base64::Engine as _;
use mint_plugins::types::Edit;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The canonical bytes of `edits` and their digest (`sha256:<hex>`).
pub fn encode(edits: &[Edit]) -> (String, Vec<u8>) {
    let list: Vec<Value> = edits
        .iter()
        .map(|e| match e {
            Edit::WriteFile(w) => json!({
                "op": "write", "path": w.path, "mode": w.meta.mode, "uid": w.meta.uid, "gid": w.meta.gid,
                "contents": base64::engine::general_purpose::STANDARD.encode(&w.contents),
            }),
            Edit::Remove(p) => json!({ "op": "remove", "path": p }),
            Edit::Symlink(s) => json!({ "op": "symlink", "path": s.path, "target": s.target }),
            Edit::MakeDir(d) => json!({ "op": "mkdir", "path": d.path, "mode": d.meta.mode, "uid": d.meta.uid, "gid": d.meta.gid }),
        })
        .collect();
    let bytes = serde_json::to_vec(&list).expect("JSON values serialise");
    (
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
        bytes,
    )
}
