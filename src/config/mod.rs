//! Configuration: the TOML file and the command-line flags, resolved into one validated
//! [`Config`] that the rest of lamina trusts; and (`containerd`) what containerd's own config
//! needs in order to use lamina.

pub mod containerd;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const DEFAULT_ROOT: &str = "/var/lib/lamina";
pub const DEFAULT_ADDRESS: &str = "/run/lamina/lamina.sock";
/// containerd's own socket, where lamina's differ reads layers from its content store.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Read when no `--config` is given and it exists: the file the package installs and
/// lamina.service names, so that a daemon started by hand runs with the same settings.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/lamina/config.toml";

/// The default configuration file, every key commented (`lamina config default`).
pub const DEFAULT_FILE: &str = include_str!("../../packaging/config.toml");

/// The file as the user wrote it: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    root: Option<PathBuf>,
    address: Option<PathBuf>,
    sync_remove: Option<bool>,
    durable_commit: Option<bool>,
    upperdir_label: Option<bool>,
    slow_chown: Option<bool>,
    mount_options: Option<Vec<String>>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    metrics_address: Option<String>,
    socket_group: Option<Group>,
    containerd_address: Option<PathBuf>,
}

/// `socket_group` as written: a name, or a number, either as a TOML integer (as `lamina config
/// dump` writes it) or as a string of digits.
#[derive(Debug)]
enum Group {
    Id(u32),
    Name(String),
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Group, D::Error> {
        use serde::de::{Error as _, Unexpected, Visitor};
        struct NameOrNumber;
        impl Visitor<'_> for NameOrNumber {
            type Value = Group;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a group name or number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Group, E> {
                Ok(Group::Name(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Group, E> {
                u32::try_from(v)
                    .map(Group::Id)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(NameOrNumber)
            .map_err(|e| D::Error::custom(e.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Values given on the command line (every command that reads the configuration takes them);
/// they win over the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// TOML config file; flags given here override it [default: /etc/lamina/config.toml, when
    /// it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding the store and the snapshots [default: /var/lib/lamina].
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/lamina/lamina.sock].
    #[arg(long, value_name = "PATH")]
    pub address: Option<PathBuf>,
    /// Log level or tracing filter (RUST_LOG, when set, wins) [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The configuration in effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Where the store and the snapshot directories live.
    pub root: PathBuf,
    /// The unix socket lamina serves on.
    pub address: PathBuf,
    /// Delete a snapshot's directories before Remove answers, instead of in the background
    /// right after it.
    pub sync_remove: bool,
    /// Commit makes the layer durable (syncs the snapshot's filesystem) before it answers;
    /// false does as containerd's own overlayfs snapshotter does, and a power cut after the
    /// answer can leave the layer's files empty or missing.
    pub durable_commit: bool,
    /// Report `containerd.io/snapshot/overlay.upperdir` in Info labels.
    pub upperdir_label: bool,
    /// containerd may fall back to copying and chowning each layer for a user-namespaced
    /// container where lamina cannot ID-map it (`lamina config containerd` then leaves out the
    /// `only-remap-ids` capability), as containerd's overlayfs `slow_chown`.
    pub slow_chown: bool,
    /// Extra options for every overlay mount (never for bind mounts).
    pub mount_options: Vec<String>,
    /// A tracing filter: a level (`info`) or directives (`lamina=debug`). `RUST_LOG` wins.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Group owning the socket (name or number); the socket is 0660, so its members may
    /// connect. None: the group of the lamina process (root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<u32>,
    /// Where to serve Prometheus metrics (`host:port` or `unix:/path`); none by default.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub metrics_address: Option<Address>,
    /// containerd's socket: lamina's differ (the Diff service's Apply) reads each layer's
    /// blob from containerd's content store there.
    pub containerd_address: PathBuf,
}

/// Where the scrape endpoint listens: `host:port`, or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{s:?}: a unix socket path must be absolute"));
            }
            return Ok(Address::Unix(path));
        }
        s.parse().map(Address::Tcp).map_err(|_| {
            format!("{s:?} is neither host:port (e.g. 127.0.0.1:9100) nor unix:/absolute/path")
        })
    }
}

fn display<S: serde::Serializer>(
    v: &Option<Address>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(Address::Tcp(a)) => s.serialize_str(&a.to_string()),
        Some(Address::Unix(p)) => s.serialize_str(&format!("unix:{}", p.display())),
        None => s.serialize_none(),
    }
}

impl Config {
    /// Reads the file named by `flags.config`, else [`DEFAULT_CONFIG_FILE`] when it exists, and
    /// applies the flags over it.
    ///
    /// `LAMINA_CONFIG` in the environment names another default file, or none when empty (the
    /// tests set it so, so that a machine's own configuration never reaches them).
    pub fn load(flags: &Flags) -> Result<Config> {
        let default = match std::env::var_os("LAMINA_CONFIG") {
            Some(path) if path.is_empty() => None,
            Some(path) => Some(PathBuf::from(path)),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        let path = flags.config.as_deref().or(default.as_deref());
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::io("reading config file", path, e))?;
                parse_file(&text)
                    .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?
            }
            None => File::default(),
        };
        resolve(file, flags)
    }
}

impl Config {
    /// The configuration as a TOML file that `--config` would read back unchanged.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serializes")
    }
}

fn parse_file(text: &str) -> std::result::Result<File, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
}

fn resolve(file: File, flags: &Flags) -> Result<Config> {
    let config = Config {
        root: flags
            .root
            .clone()
            .or(file.root)
            .unwrap_or_else(|| DEFAULT_ROOT.into()),
        address: flags
            .address
            .clone()
            .or(file.address)
            .unwrap_or_else(|| DEFAULT_ADDRESS.into()),
        sync_remove: file.sync_remove.unwrap_or(false),
        durable_commit: file.durable_commit.unwrap_or(true),
        upperdir_label: file.upperdir_label.unwrap_or(false),
        slow_chown: file.slow_chown.unwrap_or(false),
        mount_options: file.mount_options.unwrap_or_default(),
        log_level: flags
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into()),
        log_format: flags
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
        metrics_address: file
            .metrics_address
            .map(|a| {
                a.parse()
                    .map_err(|e| Error::Config(format!("metrics_address: {e}")))
            })
            .transpose()?,
        socket_group: match file.socket_group {
            None => None,
            Some(Group::Id(gid)) => Some(gid),
            Some(Group::Name(name)) => Some(group_id(&name)?),
        },
        containerd_address: file
            .containerd_address
            .unwrap_or_else(|| DEFAULT_CONTAINERD_ADDRESS.into()),
    };
    validate(&config)?;
    Ok(config)
}

fn validate(c: &Config) -> Result<()> {
    absolute("root", &c.root)?;
    absolute("address", &c.address)?;
    absolute("containerd_address", &c.containerd_address)?;
    // Paths go to containerd in mount specs and to operators in TOML, both UTF-8 only.
    for (key, path) in [("root", &c.root), ("address", &c.address)] {
        if path.to_str().is_none() {
            return Err(Error::Config(format!(
                "{key}: {} is not valid UTF-8; use a path of UTF-8 names",
                path.display()
            )));
        }
    }
    // Overlay mount options are separated by ',' and lower directories by ':', with no
    // escaping that containerd applies: a root holding either would mount the wrong paths.
    let root = c.root.to_str().unwrap_or_default();
    if let Some(sep) = root.chars().find(|ch| matches!(ch, ',' | ':')) {
        return Err(Error::Config(format!(
            "root: {root} contains {sep:?}, which overlayfs mount options use as a separator \
             (lowerdir=a:b,upperdir=…); choose a root without ',' or ':'"
        )));
    }
    for opt in &c.mount_options {
        let name = opt.split('=').next().unwrap_or_default();
        if opt.is_empty() || opt.contains(',') {
            return Err(Error::Config(format!(
                "mount_options: {opt:?} must be one non-empty option per entry (no commas)"
            )));
        }
        if matches!(
            name,
            "lowerdir" | "upperdir" | "workdir" | "lowerdir+" | "datadir+"
        ) {
            return Err(Error::Config(format!(
                "mount_options: {opt:?} is set by lamina for each snapshot and cannot be configured"
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&c.log_level).map_err(|e| {
        Error::Config(format!(
            "log_level: {:?} is not a level (error, warn, info, debug, trace) or filter: {e}",
            c.log_level
        ))
    })?;
    Ok(())
}

/// A group name or number, resolved now so that a typo stops lamina at start.
fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(Error::Config(format!(
            "socket_group: no group named {group:?}"
        ))),
        Err(e) => Err(Error::Config(format!(
            "socket_group: looking up {group:?}: {e}"
        ))),
    }
}

fn absolute(key: &str, path: &Path) -> Result<()> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{key}: {} must be an absolute path",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn from(text: &str, flags: &Flags) -> Result<Config> {
        resolve(parse_file(text).map_err(Error::Config)?, flags)
    }

    #[test]
    fn defaults() {
        let c = from("", &Flags::default()).unwrap();
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert!(!c.sync_remove && !c.upperdir_label);
        assert!(
            c.durable_commit,
            "a Commit is durable unless asked otherwise"
        );
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn the_packaged_file_states_the_defaults() {
        assert_eq!(
            from(DEFAULT_FILE, &Flags::default()).unwrap(),
            from("", &Flags::default()).unwrap()
        );
    }

    /// A config with every key set to something other than its default. A struct literal, with
    /// no `..` base, on purpose: a new key does not compile until it is given a value here,
    /// and from then on the tests below round-trip it and look for it in the packaged file.
    fn every_key_set(metrics: &str) -> Config {
        Config {
            root: "/srv/lamina root".into(),
            address: "/srv/run/l.sock".into(),
            sync_remove: true,
            durable_commit: false,
            upperdir_label: true,
            slow_chown: true,
            mount_options: vec!["volatile".into(), "metacopy=on".into()],
            log_level: "lamina=debug,warn".into(),
            log_format: LogFormat::Json,
            socket_group: Some(4321),
            metrics_address: Some(metrics.parse().unwrap()),
            containerd_address: "/srv/containerd/c.sock".into(),
        }
    }

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// The keys as `config dump` writes them, from the config itself, so that a new key is
    /// never left out of the list.
    fn every_key() -> std::collections::BTreeSet<String> {
        table(&every_key_set("127.0.0.1:9100").to_toml())
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn a_dump_reads_back_as_the_same_config_with_every_key() {
        let defaults = table(&from("", &Flags::default()).unwrap().to_toml());
        for metrics in ["127.0.0.1:9100", "[::1]:9100", "unix:/run/lamina/m.sock"] {
            let c = every_key_set(metrics);
            let dump = c.to_toml();
            let written = table(&dump);
            // Each key is in the dump with a value of its own, or the round trip proves little.
            for key in every_key() {
                assert!(written.contains_key(&key), "{key} missing from {dump}");
                assert_ne!(
                    written.get(&key),
                    defaults.get(&key),
                    "{key}: give it a non-default value in every_key_set"
                );
            }
            let back = from(&dump, &Flags::default())
                .unwrap_or_else(|e| panic!("the dump does not read back: {e}\n{dump}"));
            assert_eq!(back, c, "{dump}");
        }
    }

    /// The packaged file states every key (commented out where it has no default), and with
    /// each of them uncommented it still reads, and its dump reads back the same.
    #[test]
    fn the_packaged_file_names_every_key_and_each_round_trips() {
        let assignment = regex::Regex::new(r"^(?:# )?([a-z_]+) = ").unwrap();
        let mut named = std::collections::BTreeSet::new();
        let mut uncommented = String::new();
        for line in DEFAULT_FILE.lines() {
            match assignment.captures(line) {
                Some(key) => {
                    named.insert(key[1].to_string());
                    uncommented.push_str(line.trim_start_matches("# "));
                }
                None => uncommented.push_str(line),
            }
            uncommented.push('\n');
        }
        assert_eq!(named, every_key(), "keys of packaging/config.toml");
        let c = from(&uncommented, &Flags::default()).unwrap();
        assert!(c.socket_group.is_some() && c.metrics_address.is_some());
        assert_eq!(from(&c.to_toml(), &Flags::default()).unwrap(), c);
    }

    #[test]
    fn socket_group_by_name_or_number() {
        let c = |t: &str| from(t, &Flags::default()).unwrap().socket_group;
        assert_eq!(c("socket_group = \"root\""), Some(0));
        assert_eq!(c("socket_group = \"1234\""), Some(1234));
        assert_eq!(c("socket_group = 1234"), Some(1234));
        assert_eq!(c(""), None);
        let err = |t: &str| from(t, &Flags::default()).unwrap_err().to_string();
        assert!(err("socket_group = -1").contains("socket_group"));
        assert!(err("socket_group = 4294967296").contains("a group name or number"));
        assert!(err("socket_group = true").contains("a group name or number"));
    }

    #[test]
    fn flags_override_the_file() {
        let flags = Flags {
            root: Some("/flag".into()),
            ..Flags::default()
        };
        let c = from(
            "root = \"/file\"\naddress = \"/a.sock\"\nsync_remove = true\ndurable_commit = false",
            &flags,
        )
        .unwrap();
        assert_eq!(c.root, PathBuf::from("/flag"));
        assert_eq!(c.address, PathBuf::from("/a.sock"));
        assert!(c.sync_remove);
        assert!(!c.durable_commit);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |t: &str| from(t, &Flags::default()).unwrap_err().to_string();
        assert!(err("roots = \"/x\"").contains("roots"));
        assert!(err("sync_remove = \"yes\"").contains("sync_remove"));
        assert!(err("durable_commit = 1").contains("durable_commit"));
        assert!(err("root = \"relative\"").contains("root"));
        assert!(err("mount_options = [\"upperdir=/x\"]").contains("upperdir"));
        assert!(err("mount_options = [\"a,b\"]").contains("mount_options"));
        assert!(err("log_format = \"xml\"").contains("log_format"));
        assert!(err("log_level = \"=[\"").contains("log_level"));
        assert!(err("metrics_address = \"nowhere\"").contains("metrics_address"));
        assert!(err("socket_group = \"no-such-group-here\"").contains("socket_group"));
        assert!(err("metrics_address = \"unix:rel\"").contains("metrics_address"));
        assert!(err("root = \"/var/lib/a,b\"").contains("separator"));
        assert!(err("root = \"/var/lib/a:b\"").contains("separator"));
        let flags = Flags {
            root: Some(std::ffi::OsStr::from_bytes(b"/var/lib/\xff").into()),
            ..Flags::default()
        };
        let e = from("", &flags).unwrap_err().to_string();
        assert!(e.contains("root") && e.contains("UTF-8"), "{e}");
    }
}
