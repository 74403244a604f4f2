//! What the shell and `man` need of `mint`: completion scripts (`mint completion SHELL`)
//! and manual pages (`mint man --out-dir DIR`), both generated from the command line's own
//! definition, so they cannot drift from what `mint` accepts.

use crate::Failure;
use anyhow::anyhow;
use std::path::Path;

/// The shells `mint completion` writes scripts for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    /// `source <(mint completion bash)`, or save it under bash-completion's completions.
    Bash,
    /// Save it as `_mint` in a directory of `$fpath`.
    Zsh,
    /// Save it as `~/.config/fish/completions/mint.fish`.
    Fish,
}

/// Writes the completion script for `shell` to stdout.
pub fn completion(mut cmd: clap::Command, shell: Shell) -> Result<(), Failure> {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

/// Writes `mint.1` and a page for every subcommand (`mint-tier-scale.1`, ...) into `dir`,
/// creating it; lists what it wrote on stdout.
pub fn man(cmd: clap::Command, dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::usage(anyhow!("--out-dir {}: {e}", dir.display())))?;
    clap_mangen::generate_to(cmd, dir)
        .map_err(|e| Failure::usage(anyhow!("--out-dir {}: {e}", dir.display())))?;
    let mut pages: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Failure::usage(anyhow!("--out-dir {}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for p in pages {
        println!("{}", p.display());
    }
    Ok(())
}
