//! What every plugin kind shares: its configuration, its error type and logging.

use serde::de::DeserializeOwned;
use std::fmt;

/// A plugin's configuration for one call: the manifest's defaults overlaid with what the
/// operator set. Read typed values with [`Config::get`] or the whole object with
/// [`Config::parse`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config(serde_json::Map<String, serde_json::Value>);

impl Config {
    /// An empty configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the JSON object the host passes. A configuration that is not an object is an
    /// [`ErrorKind::InvalidInput`] error.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => Ok(Self(map)),
            Ok(other) => Err(Error::invalid_input(format!(
                "configuration must be a JSON object, got {other}"
            ))),
            Err(e) => Err(Error::invalid_input(format!(
                "configuration is not JSON: {e}"
            ))),
        }
    }

    /// Builds a configuration from a JSON value (handy in tests:
    /// `Config::from_value(serde_json::json!({"domains": ["zone"]}))`).
    pub fn from_value(value: serde_json::Value) -> Result<Self, Error> {
        Self::from_json(&value.to_string())
    }

    /// The value of `key` as `T`, or none when the key is absent. A value of the wrong
    /// type is an error that names the key.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match self.0.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::invalid_input(format!("configuration key `{key}`: {e}"))),
        }
    }

    /// The value of `key` as `T`, or `default` when absent.
    pub fn get_or<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T, Error> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// The whole configuration as one typed structure. Use
    /// `#[serde(deny_unknown_fields)]` to turn a misspelt key into a clear error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(serde_json::Value::Object(self.0.clone()))
            .map_err(|e| Error::invalid_input(format!("configuration: {e}")))
    }
}

/// Why a plugin refused a call; the host shows the message to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What was wrong and, where possible, what would fix it.
    pub message: String,
}

/// The class of a plugin's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input or the configuration cannot be served as asked.
    InvalidInput,
    /// The request cannot be satisfied (a policy with too few eligible nodes).
    Unsatisfiable,
    /// Something outside the plugin failed.
    External,
    /// The plugin reached a state it did not expect.
    Internal,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    /// An [`ErrorKind::InvalidInput`] error.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// An [`ErrorKind::Unsatisfiable`] error.
    pub fn unsatisfiable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsatisfiable, message)
    }
    /// An [`ErrorKind::External`] error.
    pub fn external(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::External, message)
    }
    /// An [`ErrorKind::Internal`] error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

/// Converts the SDK's error into a world's generated `plugin-error`. Each world has its
/// own generated copy of the shared types, hence a macro rather than a `From` impl.
macro_rules! impl_plugin_error_conversion {
    ($($seg:ident)::+) => {
        impl From<$crate::Error> for $($seg)::+::PluginError {
            fn from(e: $crate::Error) -> Self {
                use $($seg)::+::ErrorKind as K;
                let kind = match e.kind {
                    $crate::ErrorKind::InvalidInput => K::InvalidInput,
                    $crate::ErrorKind::Unsatisfiable => K::Unsatisfiable,
                    $crate::ErrorKind::External => K::External,
                    $crate::ErrorKind::Internal => K::Internal,
                };
                Self { kind, message: e.message }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use impl_plugin_error_conversion;

/// Structured logging to the host's event log. Natively (in unit tests) lines are kept by
/// [`crate::testing`] and can be read with [`crate::testing::take_logs`].
pub mod log {
    /// A log line's severity.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        /// Fine detail.
        Trace,
        /// Detail for the plugin's author.
        Debug,
        /// What an operator may want to know.
        Info,
        /// Something odd that did not stop the call.
        Warn,
        /// Something that failed.
        Error,
    }

    /// Logs `message` with key/value `fields` at `level`.
    pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
        crate::common::host_log(level, message, fields)
    }
    /// Logs at [`Level::Info`].
    pub fn info(message: &str) {
        log(Level::Info, message, &[])
    }
    /// Logs at [`Level::Warn`].
    pub fn warn(message: &str) {
        log(Level::Warn, message, &[])
    }
    /// Logs at [`Level::Debug`].
    pub fn debug(message: &str) {
        log(Level::Debug, message, &[])
    }
}

#[cfg(all(
    target_arch = "wasm32",
    any(
        all(feature = "policy", feature = "customizer"),
        all(feature = "policy", feature = "driver"),
        all(feature = "customizer", feature = "driver")
    )
))]
compile_error!(
    "a mint plugin implements one kind: enable only one of the features `policy`, `customizer`, `driver`"
);

/// Sends a log line to the host of whichever world this plugin implements.
#[allow(unused_macros)]
macro_rules! host_log_via {
    ($host:path, $level:expr, $message:expr, $fields:expr) => {{
        use $host as h;
        let level = match $level {
            log::Level::Trace => h::LogLevel::Trace,
            log::Level::Debug => h::LogLevel::Debug,
            log::Level::Info => h::LogLevel::Info,
            log::Level::Warn => h::LogLevel::Warn,
            log::Level::Error => h::LogLevel::Error,
        };
        let fields: Vec<(String, String)> = $fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        h::log(level, $message, &fields);
    }};
}

#[allow(unused_variables)]
pub(crate) fn host_log(level: log::Level, message: &str, fields: &[(&str, &str)]) {
    #[cfg(all(target_arch = "wasm32", feature = "policy"))]
    host_log_via!(
        crate::policy::bindings::mint::plugin::host,
        level,
        message,
        fields
    );
    #[cfg(all(target_arch = "wasm32", feature = "customizer"))]
    host_log_via!(
        crate::customizer::bindings::mint::plugin::host,
        level,
        message,
        fields
    );
    #[cfg(all(target_arch = "wasm32", feature = "driver"))]
    host_log_via!(
        crate::driver::bindings::mint::plugin::host,
        level,
        message,
        fields
    );
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message, fields);
}

/// The configuration of the current call: from the host inside a component, from
/// [`crate::testing`] natively.
#[allow(unreachable_code)]
pub(crate) fn host_config() -> Result<Config, Error> {
    #[cfg(all(target_arch = "wasm32", feature = "policy"))]
    return Config::from_json(&crate::policy::bindings::mint::plugin::host::config());
    #[cfg(all(target_arch = "wasm32", feature = "customizer"))]
    return Config::from_json(&crate::customizer::bindings::mint::plugin::host::config());
    #[cfg(all(target_arch = "wasm32", feature = "driver"))]
    return Config::from_json(&crate::driver::bindings::mint::plugin::host::config());
    #[cfg(not(target_arch = "wasm32"))]
    return Ok(crate::testing::current_config());
    Ok(Config::new())
}

/// How long the current call has left before the host's wall-clock limit
/// (`capabilities.timeout-ms`) ends it. A plugin that waits on something outside uses it
/// to answer in time. Natively (unit tests) it is 60 s.
#[allow(unreachable_code)]
pub fn remaining() -> std::time::Duration {
    #[cfg(all(target_arch = "wasm32", feature = "policy"))]
    return std::time::Duration::from_millis(
        crate::policy::bindings::mint::plugin::host::remaining_ms(),
    );
    #[cfg(all(target_arch = "wasm32", feature = "customizer"))]
    return std::time::Duration::from_millis(
        crate::customizer::bindings::mint::plugin::host::remaining_ms(),
    );
    #[cfg(all(target_arch = "wasm32", feature = "driver"))]
    return std::time::Duration::from_millis(
        crate::driver::bindings::mint::plugin::host::remaining_ms(),
    );
    std::time::Duration::from_secs(60)
}
