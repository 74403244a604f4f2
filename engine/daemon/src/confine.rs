//! Where `materialize` may write: only below the directory the operator configured
//! (`[materialize] root`), never through a symlink, never climbing with `..`, and only into a
//! directory that does not exist yet.

use std::path::{Component, Path, PathBuf};

/// The new directory `into` names below `root`: a relative path is taken from `root`, an
/// absolute one must lie inside it. Missing intermediate directories are created one by one
/// (none of them may be a symlink or a file); the last component must not exist. `Err` says
/// why, naming the field.
pub fn new_dir_under(root: &Path, into: &str) -> Result<PathBuf, String> {
    let root = root.canonicalize().map_err(|e| {
        format!(
            "the materialize root {} cannot be used: {e}",
            root.display()
        )
    })?;
    let given = Path::new(into);
    let relative = if given.is_absolute() {
        given.strip_prefix(&root).map_err(|_| {
            format!(
                "field `into`: {into} is outside the materialize root {}; give a path below it",
                root.display()
            )
        })?
    } else {
        given
    };
    let mut names = Vec::new();
    for c in relative.components() {
        match c {
            Component::Normal(n) => names.push(n.to_os_string()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "field `into`: `{into}` must be a plain path below the materialize root (no `..`)"
                ));
            }
        }
    }
    let Some((last, parents)) = names.split_last() else {
        return Err(format!(
            "field `into`: `{into}` names the materialize root itself; name a new directory below it"
        ));
    };
    let mut at = root.clone();
    for n in parents {
        at.push(n);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "field `into`: {} is a symlink; materialize never writes through one",
                    at.display()
                ));
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!("field `into`: {} is not a directory", at.display()));
            }
            Ok(_) => {}
            Err(_) => std::fs::create_dir(&at)
                .map_err(|e| format!("field `into`: cannot create {}: {e}", at.display()))?,
        }
    }
    at.push(last);
    if std::fs::symlink_metadata(&at).is_ok() {
        return Err(format!(
            "field `into`: {} exists; materialize into a new directory",
            at.display()
        ));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_directories_below_the_root() {
        let base = std::env::temp_dir().join(format!("mint-confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("taken")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let root_c = root.canonicalize().unwrap();
        assert_eq!(new_dir_under(&root, "a/b/c").unwrap(), root_c.join("a/b/c"));
        assert!(
            root.join("a/b").is_dir() && !root.join("a/b/c").exists(),
            "parents made, the last left to the caller"
        );
        assert_eq!(
            new_dir_under(&root, &format!("{}/d", root_c.display())).unwrap(),
            root_c.join("d")
        );
        for (into, why) in [
            ("/etc/mint-x", "outside"),
            ("../escape", "no `..`"),
            ("a/../../escape", "no `..`"),
            ("link/x", "symlink"),
            ("link", "exists"),
            ("taken", "exists"),
            ("", "root itself"),
            (".", "root itself"),
        ] {
            let e = new_dir_under(&root, into).unwrap_err();
            assert!(e.contains(why), "{into}: {e}");
        }
        assert!(!Path::new("/etc/mint-x").exists() && !base.join("escape").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
