//! Unit-testing plugins natively, without the engine: a stand-in for the host's
//! configuration, logs, master image and tier peers, plus builders for inputs.
//!
//! ```ignore
//! let master = Master::new().file("/etc/hostname", "localhost\n");
//! let edits = master.customize::<Hostname>(&instance(3, "web-003", "198.18.0.4", 24), &Config::new())?;
//! ```

#[cfg(not(target_arch = "wasm32"))]
use crate::Config;
#[cfg(not(target_arch = "wasm32"))]
use crate::log::Level;
#[cfg(not(target_arch = "wasm32"))]
use std::cell::RefCell;

/// A log line a plugin wrote during a native test.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// Its severity.
    pub level: crate::log::Level,
    /// Its message.
    pub message: String,
    /// Its key/value fields.
    pub fields: Vec<(String, String)>,
}

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static LOGS: RefCell<Vec<LogLine>> = const { RefCell::new(Vec::new()) };
    static CONFIG: RefCell<Config> = RefCell::new(Config::new());
    static CHECKING_HEALTH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(all(not(target_arch = "wasm32"), feature = "driver"))]
pub(crate) fn checking_health() -> bool {
    CHECKING_HEALTH.with(|c| c.get())
}

/// Runs `f` as the host runs a `status` call that checks a running instance's health
/// (`driver::checking_health()` answers true inside it).
#[cfg(not(target_arch = "wasm32"))]
pub fn as_health_check<R>(f: impl FnOnce() -> R) -> R {
    let old = CHECKING_HEALTH.with(|c| c.replace(true));
    let r = f();
    CHECKING_HEALTH.with(|c| c.set(old));
    r
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn record_log(level: Level, message: &str, fields: &[(&str, &str)]) {
    LOGS.with(|l| {
        l.borrow_mut().push(LogLine {
            level,
            message: message.to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    });
}

/// The log lines written on this thread since the last call, oldest first.
#[cfg(not(target_arch = "wasm32"))]
pub fn take_logs() -> Vec<LogLine> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn current_config() -> Config {
    CONFIG.with(|c| c.borrow().clone())
}

/// Runs `f` with `config` as the configuration the host would pass, as the exported
/// entry points see it. Plugins' trait methods take the configuration as a parameter, so
/// most tests need not use this.
#[cfg(not(target_arch = "wasm32"))]
pub fn with_config<R>(config: Config, f: impl FnOnce() -> R) -> R {
    let old = CONFIG.with(|c| c.replace(config));
    let r = f();
    CONFIG.with(|c| c.replace(old));
    r
}

#[cfg(all(feature = "customizer", not(target_arch = "wasm32")))]
pub use customize::*;

#[cfg(all(feature = "customizer", not(target_arch = "wasm32")))]
mod customize {
    use crate::customizer::{
        Context, CustomizeHost, Customizer, DirEntry, Edit, FileKind, FileStat, FsError, Instance,
        IpAddress, Peer,
    };
    use crate::{Config, Error};
    use std::collections::BTreeMap;

    #[derive(Clone)]
    enum Node {
        File(Vec<u8>, u32),
        Dir,
        Link(String),
    }

    /// An in-memory master image and tier, standing in for the host in native tests.
    #[derive(Clone, Default)]
    pub struct Master {
        nodes: BTreeMap<String, Node>,
        peers: Vec<Peer>,
    }

    impl Master {
        /// An empty master holding only `/`.
        pub fn new() -> Self {
            let mut m = Self::default();
            m.nodes.insert("/".into(), Node::Dir);
            m
        }
        fn add_parents(&mut self, path: &str) {
            let mut at = 0;
            while let Some(i) = path[at + 1..].find('/') {
                at += i + 1;
                self.nodes
                    .entry(path[..at].to_string())
                    .or_insert(Node::Dir);
            }
        }
        /// Adds a file (mode 0644) and its parent directories.
        pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>) -> Self {
            self.add_parents(path);
            self.nodes
                .insert(path.into(), Node::File(contents.into(), 0o644));
            self
        }
        /// Adds a directory and its parents.
        pub fn dir(mut self, path: &str) -> Self {
            self.add_parents(path);
            self.nodes
                .insert(path.trim_end_matches('/').into(), Node::Dir);
            self
        }
        /// Adds a symlink.
        pub fn symlink(mut self, path: &str, target: &str) -> Self {
            self.add_parents(path);
            self.nodes.insert(path.into(), Node::Link(target.into()));
            self
        }
        /// Sets the tier's peers (by default a test tier has none but the instance).
        pub fn peers(mut self, peers: Vec<Peer>) -> Self {
            self.peers = peers;
            self
        }
        /// Runs customizer `C` for `instance` with `config` against this master.
        pub fn customize<C: Customizer>(
            &self,
            instance: &Instance,
            config: &Config,
        ) -> Result<Vec<Edit>, Error> {
            C::customize(&Context::new(instance, config, self))
        }
        fn check(path: &str) -> Result<(), FsError> {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(FsError::InvalidPath(format!(
                    "{path} must be absolute, without `..`"
                )));
            }
            Ok(())
        }
    }

    impl CustomizeHost for Master {
        fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError> {
            Self::check(path)?;
            Ok(self.nodes.get(path).map(|n| {
                let (kind, size, mode) = match n {
                    Node::File(b, m) => (FileKind::File, b.len() as u64, *m),
                    Node::Dir => (FileKind::Directory, 0, 0o755),
                    Node::Link(t) => (FileKind::Symlink, t.len() as u64, 0o777),
                };
                FileStat {
                    kind,
                    size,
                    mode,
                    uid: 0,
                    gid: 0,
                }
            }))
        }
        fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError> {
            Self::check(path)?;
            match self.nodes.get(path) {
                None => Ok(None),
                Some(Node::File(b, _)) if b.len() as u64 > max_bytes => {
                    Err(FsError::TooLarge(b.len() as u64))
                }
                Some(Node::File(b, _)) => Ok(Some(b.clone())),
                Some(Node::Dir) => Err(FsError::WrongKind(format!("{path} is a directory"))),
                Some(Node::Link(t)) => {
                    let target = if t.starts_with('/') {
                        t.clone()
                    } else {
                        format!("{}/{t}", &path[..path.rfind('/').unwrap_or(0)])
                    };
                    self.read_file(&target, max_bytes)
                }
            }
        }
        fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError> {
            Self::check(path)?;
            match self.nodes.get(path) {
                None => Ok(None),
                Some(Node::Dir) => {
                    let prefix = if path == "/" {
                        "/".to_string()
                    } else {
                        format!("{path}/")
                    };
                    let entries = self
                        .nodes
                        .iter()
                        .filter(|(p, _)| {
                            p.len() > prefix.len()
                                && p.starts_with(&prefix)
                                && !p[prefix.len()..].contains('/')
                        })
                        .map(|(p, n)| DirEntry {
                            name: p[prefix.len()..].to_string(),
                            kind: match n {
                                Node::File(..) => FileKind::File,
                                Node::Dir => FileKind::Directory,
                                Node::Link(_) => FileKind::Symlink,
                            },
                        })
                        .collect();
                    Ok(Some(entries))
                }
                Some(_) => Err(FsError::WrongKind(format!("{path} is not a directory"))),
            }
        }
        fn read_link(&self, path: &str) -> Result<Option<String>, FsError> {
            Self::check(path)?;
            Ok(match self.nodes.get(path) {
                Some(Node::Link(t)) => Some(t.clone()),
                _ => None,
            })
        }
        fn peers(&self, start: u32, len: u32) -> Vec<Peer> {
            self.peers
                .iter()
                .skip(start as usize)
                .take(len.min(4096) as usize)
                .cloned()
                .collect()
        }
    }

    /// An instance identity for tests: index, host name, IPv4 or IPv6 address and prefix,
    /// tier `test`, no gateway, no DNS, K = index + 1.
    pub fn instance(index: u32, hostname: &str, address: &str, prefix_len: u8) -> Instance {
        let ip: std::net::IpAddr = address
            .parse()
            .expect("testing::instance: address must parse");
        Instance {
            tier: "test".into(),
            index,
            hostname: hostname.into(),
            address: IpAddress::from(ip),
            prefix_len,
            gateway: None,
            dns: Vec::new(),
            peer_count: index + 1,
        }
    }

    /// The contents of the file an edit list writes at `path`, as text.
    pub fn written(edits: &[Edit], path: &str) -> Option<String> {
        edits.iter().rev().find_map(|e| match e {
            Edit::WriteFile(w) if w.path == path => {
                Some(String::from_utf8_lossy(&w.contents).into_owned())
            }
            _ => None,
        })
    }
}

#[cfg(all(feature = "policy", not(target_arch = "wasm32")))]
pub use select::*;

#[cfg(all(feature = "policy", not(target_arch = "wasm32")))]
mod select {
    use crate::policy::{Candidate, LabelRef, Placement, Request, Requirements};

    /// Builds a selection request from readable node descriptions, interning labels the
    /// way the host does.
    #[derive(Default)]
    pub struct RequestBuilder {
        request: Option<Request>,
        names: Vec<String>,
    }

    /// A request built for a test, with the names of its candidates (which the request
    /// itself does not carry: the host keeps them).
    pub struct TestRequest {
        /// The request as a policy receives it.
        pub request: Request,
        /// Candidate names by index.
        pub names: Vec<String>,
    }

    impl TestRequest {
        /// The names of the chosen candidates, in order.
        pub fn names_of(&self, chosen: &[crate::policy::Choice]) -> Vec<&str> {
            chosen
                .iter()
                .map(|c| {
                    self.names
                        .get(c.candidate as usize)
                        .map(String::as_str)
                        .unwrap_or("?")
                })
                .collect()
        }
    }

    impl std::ops::Deref for TestRequest {
        type Target = Request;
        fn deref(&self) -> &Request {
            &self.request
        }
    }

    impl RequestBuilder {
        /// A request for `count` nodes of tier `tier` with no requirements.
        pub fn new(tier: &str, count: u32) -> Self {
            Self {
                names: Vec::new(),
                request: Some(Request {
                    tier: tier.into(),
                    count,
                    requirements: Requirements {
                        labels: vec![],
                        min_cpus: 0,
                        min_memory_mib: 0,
                        arch: None,
                    },
                    label_keys: vec![],
                    label_values: vec![],
                    placed: vec![],
                    labels: vec![],
                    candidates: vec![],
                }),
            }
        }
        fn req(&mut self) -> &mut Request {
            self.request.as_mut().expect("builder used after build")
        }
        fn intern(table: &mut Vec<String>, s: &str) -> u32 {
            match table.iter().position(|x| x == s) {
                Some(i) => i as u32,
                None => {
                    table.push(s.into());
                    (table.len() - 1) as u32
                }
            }
        }
        fn labels(&mut self, labels: &[(&str, &str)]) -> Vec<LabelRef> {
            let r = self.req();
            labels
                .iter()
                .map(|(k, v)| LabelRef {
                    key: Self::intern(&mut r.label_keys, k),
                    value: Self::intern(&mut r.label_values, v),
                })
                .collect()
        }
        /// Adds a free x86_64 node with 4 cpus and 8 GiB, `labels` and `load` (thousandths).
        pub fn node(mut self, name: &str, labels: &[(&str, &str)], load: u32) -> Self {
            let labels = self.labels(labels);
            self.names.push(name.into());
            let r = self.req();
            let arch = Self::intern(&mut r.label_values, "x86_64");
            let labels_start = r.labels.len() as u32;
            let labels_len = labels.len() as u32;
            r.labels.extend(labels);
            r.candidates.push(Candidate {
                cpus: 4,
                memory_mib: 8192,
                arch,
                labels_start,
                labels_len,
                load,
            });
            self
        }
        /// Adds a node with explicit resources.
        pub fn node_with(
            mut self,
            name: &str,
            labels: &[(&str, &str)],
            cpus: u32,
            memory_mib: u64,
            load: u32,
        ) -> Self {
            self = self.node(name, labels, load);
            let c = self.req().candidates.last_mut().expect("just pushed");
            c.cpus = cpus;
            c.memory_mib = memory_mib;
            self
        }
        /// Records a node that already runs an instance of the tier.
        pub fn placed(mut self, labels: &[(&str, &str)]) -> Self {
            let labels = self.labels(labels);
            self.req().placed.push(Placement { labels });
            self
        }
        /// Requires a label on chosen nodes.
        pub fn require_label(mut self, key: &str, value: &str) -> Self {
            let l = self.labels(&[(key, value)]);
            self.req().requirements.labels.extend(l);
            self
        }
        /// Requires at least `cpus` cpus and `memory_mib` MiB.
        pub fn require_resources(mut self, cpus: u32, memory_mib: u64) -> Self {
            let r = self.req();
            r.requirements.min_cpus = cpus;
            r.requirements.min_memory_mib = memory_mib;
            self
        }
        /// The finished request, with its candidates' names.
        pub fn build(mut self) -> TestRequest {
            TestRequest {
                request: self.request.take().expect("builder used after build"),
                names: std::mem::take(&mut self.names),
            }
        }
    }
}

#[cfg(all(feature = "driver", not(target_arch = "wasm32")))]
pub use http_stub::*;

#[cfg(all(feature = "driver", not(target_arch = "wasm32")))]
mod http_stub {
    use crate::http::{HttpError, Request, Response};
    use std::cell::RefCell;

    type Responder = Box<dyn FnMut(&Request) -> Result<Response, HttpError>>;

    thread_local! {
        static HTTP: RefCell<Option<Responder>> = const { RefCell::new(None) };
    }

    /// Runs `f` with `responder` answering every request a driver sends on this thread, as
    /// the network would inside a component (natively there is none).
    pub fn with_http<R>(
        responder: impl FnMut(&Request) -> Result<Response, HttpError> + 'static,
        f: impl FnOnce() -> R,
    ) -> R {
        let old = HTTP.with(|h| h.replace(Some(Box::new(responder))));
        let r = f();
        HTTP.with(|h| h.replace(old));
        r
    }

    pub(crate) fn http_answer(r: &Request) -> Result<Response, HttpError> {
        HTTP.with(|h| match h.borrow_mut().as_mut() {
            Some(respond) => respond(r),
            None => Err(HttpError::Other(
                "no network in a native test: answer requests with testing::with_http".into(),
            )),
        })
    }
}
