//! The plugin host's errors: why a plugin did not load, and why a call failed. Each names
//! the plugin and, for calls, the function, so an operator can tell which plugin to fix.

use crate::manifest::Kind;
use std::time::Duration;

/// Why a plugin could not be loaded. Loading changes nothing when it fails.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest is malformed or asks for something the host does not allow.
    #[error("manifest {source_name}: {message}")]
    Manifest {
        /// Where the manifest came from.
        source_name: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not WebAssembly at all.
    #[error(
        "plugin `{plugin}`: {what} is not a WebAssembly component (it does not start with the `\\0asm` magic); build the plugin with `cargo build --release --target wasm32-wasip2`"
    )]
    NotWasm {
        /// The plugin's name.
        plugin: String,
        /// The file or source.
        what: String,
    },
    /// The bytes are a core module, not a component.
    #[error(
        "plugin `{plugin}`: {what} is a core WebAssembly module, not a component; build it for the `wasm32-wasip2` target (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule {
        /// The plugin's name.
        plugin: String,
        /// The file or source.
        what: String,
    },
    /// The component does not export what its kind requires.
    #[error(
        "plugin `{plugin}`: the manifest says kind `{kind}`, which exports `mint:plugin/{expected}`, but the component exports {found}"
    )]
    WrongKind {
        /// The plugin's name.
        plugin: String,
        /// The declared kind.
        kind: Kind,
        /// The interface that kind must export.
        expected: &'static str,
        /// What the component exports.
        found: String,
    },
    /// The component was built against an incompatible `mint:plugin` version.
    #[error(
        "plugin `{plugin}`: built for mint:plugin@{found}, but this engine speaks mint:plugin@{host}; rebuild the plugin against {host} (same major, and same minor while the major is 0)"
    )]
    IncompatibleWit {
        /// The plugin's name.
        plugin: String,
        /// The version the component (or its manifest) targets.
        found: String,
        /// The host's version.
        host: String,
    },
    /// The component imports something the host does not provide to its kind.
    #[error("plugin `{plugin}`: cannot link: {message}")]
    Link {
        /// The plugin's name.
        plugin: String,
        /// wasmtime's explanation, naming the import.
        message: String,
    },
    /// The component is malformed or could not be compiled.
    #[error("plugin `{plugin}`: cannot compile: {message}")]
    Compile {
        /// The plugin's name.
        plugin: String,
        /// wasmtime's explanation.
        message: String,
    },
    /// The manifest requests outbound hosts the operator did not grant.
    #[error(
        "plugin `{plugin}` requests outbound access to {host}, which the operator has not granted; grant it (for `mint plugin run`: --allow-host {host}) or remove it from the manifest"
    )]
    NotGranted {
        /// The plugin's name.
        plugin: String,
        /// The first host not granted.
        host: String,
    },
}

/// Why a call into a plugin failed. The engine keeps serving after any of these.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped: a panic, an abort, an out-of-bounds access, ...
    #[error("plugin `{plugin}` crashed in `{call}`: {message}{}", stderr_suffix(.stderr))]
    Trap {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// The trap's description.
        message: String,
        /// What the guest wrote to stderr (a Rust panic message lands here).
        stderr: String,
    },
    /// The call ran past its time limit.
    #[error(
        "plugin `{plugin}` did not finish `{call}` within {limit:?} (capabilities.timeout-ms); it was stopped"
    )]
    Timeout {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The guest tried to grow its memory past its limit.
    #[error("plugin `{plugin}` exceeded its memory limit of {limit_mib} MiB in `{call}` (capabilities.memory-mib){}", stderr_suffix(.stderr))]
    MemoryLimit {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// The limit.
        limit_mib: u64,
        /// What the guest wrote to stderr.
        stderr: String,
    },
    /// The plugin returned its own error.
    #[error("plugin `{plugin}` refused `{call}` ({kind}): {message}")]
    Refused {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// The class the plugin gave.
        kind: &'static str,
        /// The plugin's message.
        message: String,
    },
    /// The plugin's answer broke the function's contract; the host ignored it.
    #[error("plugin `{plugin}` returned an invalid answer to `{call}`: {problem}")]
    InvalidAnswer {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The host could not start the call (for example, every instance slot is busy).
    #[error("cannot call plugin `{plugin}` (`{call}`): {message}")]
    Host {
        /// The plugin's name.
        plugin: String,
        /// The exported function.
        call: &'static str,
        /// What failed.
        message: String,
    },
    /// The caller asked a plugin for a function of another kind.
    #[error("plugin `{plugin}` is a {kind}, which has no `{call}`")]
    WrongKind {
        /// The plugin's name.
        plugin: String,
        /// The function asked for.
        call: &'static str,
        /// The plugin's kind.
        kind: Kind,
    },
}

impl CallError {
    /// A short name of how the call ended, for metrics' labels: `trap`, `timeout`,
    /// `memory-limit`, `refused`, `invalid-answer`, `host` or `wrong-kind`.
    pub fn outcome(&self) -> &'static str {
        match self {
            CallError::Trap { .. } => "trap",
            CallError::Timeout { .. } => "timeout",
            CallError::MemoryLimit { .. } => "memory-limit",
            CallError::Refused { .. } => "refused",
            CallError::InvalidAnswer { .. } => "invalid-answer",
            CallError::Host { .. } => "host",
            CallError::WrongKind { .. } => "wrong-kind",
        }
    }
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!("; its stderr said: {s}")
    }
}
