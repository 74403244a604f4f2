//! The host's checks of plugin answers. A plugin is untrusted input: nothing it returns is
//! acted on before it passes these.

use crate::bindings::customizer::exports::mint::plugin::customizer::Edit;
use crate::bindings::policy::exports::mint::plugin::node_policy::{
    Candidate, Choice, SelectionRequest,
};

/// The most bytes a customizer's edits may carry for one instance.
pub const MAX_EDIT_BYTES: usize = 16 << 20;
/// The most edits one customize call may return.
pub const MAX_EDITS: usize = 10_000;
/// What the host keeps of a policy's reason.
pub const MAX_REASON_CHARS: usize = 200;

/// Whether `c` meets the request's requirements; the host's own reading, which a policy's
/// answer must agree with.
pub fn eligible(request: &SelectionRequest, c: &Candidate) -> bool {
    let r = &request.requirements;
    let start = c.labels_start as usize;
    let Some(labels) = request
        .labels
        .get(start..start.saturating_add(c.labels_len as usize))
    else {
        return false;
    };
    c.cpus >= r.min_cpus
        && c.memory_mib >= r.min_memory_mib
        && r.arch.is_none_or(|a| a == c.arch)
        && r.labels.iter().all(|want| {
            labels
                .iter()
                .any(|l| l.key == want.key && l.value == want.value)
        })
}

/// Checks a policy's choices: at most `count` (a policy places what fits), distinct, in
/// range, eligible. Reasons are
/// trimmed to [`MAX_REASON_CHARS`]. `names` (candidate names by index, which the request
/// does not carry) only make messages readable.
pub fn selection(
    request: &SelectionRequest,
    names: &[String],
    mut choices: Vec<Choice>,
) -> Result<Vec<Choice>, String> {
    let name = |i: usize| {
        names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("candidate {i}"))
    };
    if choices.len() > request.count as usize {
        return Err(format!(
            "it chose {} nodes, but {} were asked for",
            choices.len(),
            request.count
        ));
    }
    let mut seen = vec![false; request.candidates.len()];
    for ch in &mut choices {
        let i = ch.candidate as usize;
        let Some(c) = request.candidates.get(i) else {
            return Err(format!(
                "it chose candidate {i}, but there are only {} candidates (indexes 0..{})",
                request.candidates.len(),
                request.candidates.len()
            ));
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(format!("it chose node `{}` twice", name(i)));
        }
        if !eligible(request, c) {
            return Err(format!(
                "it chose node `{}`, which does not meet the tier's requirements",
                name(i)
            ));
        }
        if let Some(r) = &mut ch.reason {
            if let Some((at, _)) = r.char_indices().nth(MAX_REASON_CHARS) {
                r.truncate(at);
            }
        }
        if ch.score.is_some_and(|s| !s.is_finite()) {
            ch.score = None;
        }
    }
    Ok(choices)
}

/// Checks one path an edit names.
fn edit_path(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p == "/" {
        return Err(format!("{what} path `{p}` must be absolute and not `/`"));
    }
    if p.contains('\0') {
        return Err(format!("{what} path {p:?} holds a NUL byte"));
    }
    if p.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("{what} path `{p}` holds `.` or `..`"));
    }
    Ok(())
}

/// Checks a customizer's edits: paths absolute without `..`, modes within 0o7777, and the
/// whole answer within [`MAX_EDITS`] and [`MAX_EDIT_BYTES`].
pub fn edits(edits: &[Edit]) -> Result<(), String> {
    if edits.len() > MAX_EDITS {
        return Err(format!(
            "it returned {} edits; the limit is {MAX_EDITS}",
            edits.len()
        ));
    }
    let mut bytes = 0usize;
    for e in edits {
        match e {
            Edit::WriteFile(w) => {
                edit_path("write-file", &w.path)?;
                if w.meta.mode > 0o7777 {
                    return Err(format!(
                        "write-file `{}` has mode {:o}, beyond 7777",
                        w.path, w.meta.mode
                    ));
                }
                bytes += w.contents.len() + w.path.len();
            }
            Edit::Remove(p) => {
                edit_path("remove", p)?;
                bytes += p.len();
            }
            Edit::Symlink(s) => {
                edit_path("symlink", &s.path)?;
                if s.target.is_empty() || s.target.contains('\0') {
                    return Err(format!(
                        "symlink `{}` has an empty target or one with a NUL byte",
                        s.path
                    ));
                }
                bytes += s.path.len() + s.target.len();
            }
            Edit::MakeDir(d) => {
                edit_path("make-dir", &d.path)?;
                if d.meta.mode > 0o7777 {
                    return Err(format!(
                        "make-dir `{}` has mode {:o}, beyond 7777",
                        d.path, d.meta.mode
                    ));
                }
                bytes += d.path.len();
            }
        }
        if bytes > MAX_EDIT_BYTES {
            return Err(format!("its edits exceed {} MiB", MAX_EDIT_BYTES >> 20));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::customizer::exports::mint::plugin::customizer::{FileMeta, WriteFile};
    use crate::bindings::policy::exports::mint::plugin::node_policy::{LabelRef, Requirements};

    fn request() -> SelectionRequest {
        let node = |cpus| Candidate {
            cpus,
            memory_mib: 1024,
            arch: 0,
            labels_start: 0,
            labels_len: 1,
            load: 0,
        };
        SelectionRequest {
            tier: "t".into(),
            count: 2,
            requirements: Requirements {
                labels: vec![LabelRef { key: 0, value: 1 }],
                min_cpus: 2,
                min_memory_mib: 0,
                arch: None,
            },
            label_keys: vec!["rack".into()],
            label_values: vec!["x86_64".into(), "r1".into()],
            placed: vec![],
            labels: vec![LabelRef { key: 0, value: 1 }],
            candidates: vec![
                node(4),
                node(1),
                node(4),
                Candidate {
                    labels_start: 5,
                    ..node(4)
                },
            ],
        }
    }

    fn pick(ix: &[u32]) -> Vec<Choice> {
        ix.iter()
            .map(|&i| Choice {
                candidate: i,
                score: Some(f64::NAN),
                reason: Some("x".repeat(500)),
            })
            .collect()
    }

    #[test]
    fn selection_contract() {
        let r = request();
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let selection = |r: &SelectionRequest, c| selection(r, &names, c);
        let ok = selection(&r, pick(&[0, 2])).unwrap();
        assert_eq!(ok[0].reason.as_ref().unwrap().len(), MAX_REASON_CHARS);
        assert_eq!(ok[0].score, None);
        assert!(
            selection(&r, pick(&[0, 2, 0]))
                .unwrap_err()
                .contains("chose 3 nodes, but 2")
        );
        assert_eq!(
            selection(&r, pick(&[2])).unwrap().len(),
            1,
            "fewer than asked: what fits is placed"
        );
        assert!(
            selection(&r, pick(&[0, 0]))
                .unwrap_err()
                .contains("`a` twice")
        );
        assert!(
            selection(&r, pick(&[0, 7]))
                .unwrap_err()
                .contains("only 4 candidates")
        );
        assert!(
            selection(&r, pick(&[0, 1]))
                .unwrap_err()
                .contains("`b`, which does not meet")
        );
        // A label slice outside the request's labels is never eligible.
        assert!(
            selection(&r, pick(&[0, 3]))
                .unwrap_err()
                .contains("`d`, which does not meet")
        );
    }

    #[test]
    fn edit_contract() {
        let w = |p: &str, mode| {
            Edit::WriteFile(WriteFile {
                path: p.into(),
                contents: vec![],
                meta: FileMeta {
                    mode,
                    uid: 0,
                    gid: 0,
                },
            })
        };
        assert!(edits(&[w("/etc/hostname", 0o644)]).is_ok());
        assert!(
            edits(&[w("etc/hostname", 0o644)])
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            edits(&[w("/etc/../../x", 0o644)])
                .unwrap_err()
                .contains("..")
        );
        assert!(edits(&[w("/x", 0o17777)]).unwrap_err().contains("mode"));
        assert!(edits(&[Edit::Remove("/".into())]).is_err());
    }
}
