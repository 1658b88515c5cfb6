//! What containerd's own config needs to use lamina (`lamina config containerd`): a fragment
//! to append to containerd's `config.toml`, for the containerd series found, filled from
//! lamina's config. Pure text from plain values; the command that runs `containerd --version`
//! and probes the kernel lives in `cli`.

use std::fmt::Write as _;

use super::Config;
use crate::error::{Error, Result};

/// The containerd releases whose configs differ in what lamina needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// 1.6: config version 2; a proxy plugin has only `type` and `address`.
    V1_6,
    /// 1.7: config version 2; proxy plugins gain `exports` (and `capabilities`, which nothing
    /// in 1.7 reads for snapshotters).
    V1_7,
    /// 2.x: config version 3 (2.3 writes 4, which moves only the grpc, ttrpc, debug and metrics
    /// sections); image pulls and imports unpack through the transfer service; proxy
    /// snapshotters declare capabilities.
    V2,
}

impl Series {
    /// The series named on the command line: `1.6`, `1.7` or `2` (`2.x` accepted).
    pub fn from_name(name: &str) -> Result<Series> {
        match name {
            "1.6" => Ok(Series::V1_6),
            "1.7" => Ok(Series::V1_7),
            n if n == "2" || n.starts_with("2.") => Ok(Series::V2),
            _ => Err(Error::Config(format!(
                "containerd version {name:?}: lamina knows 1.6, 1.7 and 2 (any 2.x)"
            ))),
        }
    }

    /// The series from what `containerd --version` prints, e.g. `containerd
    /// github.com/containerd/containerd/v2 2.3.7` or Debian's `containerd
    /// github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3`: the first word that
    /// starts with a digit is the version.
    pub fn from_version_output(out: &str) -> Result<Series> {
        let version = out
            .split_whitespace()
            .map(|w| w.trim_start_matches('v'))
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
            .ok_or_else(|| {
                Error::Config(format!(
                    "no version in `containerd --version`'s output {:?}; name the series with \
                     --containerd-version 1.6|1.7|2",
                    out.trim()
                ))
            })?;
        let mut parts = version.split(|c: char| !c.is_ascii_digit());
        let major = parts.next().unwrap_or("");
        let minor = parts.next().unwrap_or("");
        match (major, minor) {
            ("1", "6") => Ok(Series::V1_6),
            ("1", "7") => Ok(Series::V1_7),
            ("2", _) => Ok(Series::V2),
            _ => Err(Error::Config(format!(
                "containerd {version} is not one lamina has a config for (1.6, 1.7, 2.x); name \
                 the nearest with --containerd-version"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Series::V1_6 => "1.6",
            Series::V1_7 => "1.7",
            Series::V2 => "2.x",
        }
    }

    /// The first line of a config file written from scratch for this series.
    fn new_file_version(self) -> &'static str {
        match self {
            Series::V1_6 | Series::V1_7 => "version = 2",
            Series::V2 => "version = 3",
        }
    }

    fn config_versions(self) -> &'static str {
        match self {
            Series::V1_6 | Series::V1_7 => "version = 2",
            Series::V2 => "version = 3 or 4",
        }
    }
}

/// What the fragment is made from besides lamina's config.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub series: Series,
    /// Include the key that makes CRI (Kubernetes) use lamina.
    pub cri: bool,
    /// The kernel can ID-map overlay lowers (5.19+), so lamina honours containerd's ID-mapping
    /// labels and can declare `remap-ids`.
    pub idmapped_mounts: bool,
    /// The platform the transfer service unpacks for, as containerd writes it (`linux/amd64`).
    pub platform: String,
    /// Also register lamina's differ (its Diff service) and have containerd unpack lamina's
    /// layers with it (1.7 and later).
    pub differ: bool,
}

/// The plugin name containerd knows lamina by in everything lamina documents.
pub const PLUGIN: &str = "lamina";
/// The name of lamina's differ (its Diff service) in containerd's config.
pub const DIFF_PLUGIN: &str = "lamina-diff";

/// The capabilities lamina declares to a containerd of `wanted.series`: only what lamina
/// implements, and only where containerd reads them (2.x). `remap-ids`: lamina ID-maps a
/// user-namespaced container's layers itself (kernel 5.19+), so containerd does not copy and
/// chown each layer. `only-remap-ids`: containerd must not fall back to that copy; left out
/// when lamina's `slow_chown` is set, as containerd's overlayfs does.
pub fn capabilities(config: &Config, wanted: &Wanted) -> Vec<&'static str> {
    let mut caps = Vec::new();
    if wanted.series == Series::V2 {
        if wanted.idmapped_mounts {
            caps.push("remap-ids");
        }
        if !config.slow_chown {
            caps.push("only-remap-ids");
        }
    }
    caps
}

/// The fragment: valid TOML to append to a containerd config of that series (one that does not
/// define these tables already), with comments saying where it goes.
pub fn fragment(config: &Config, wanted: &Wanted) -> Result<String> {
    let mut s = String::new();
    let series = wanted.series;
    let address = toml_string(&config.address.display().to_string());
    let root = toml_string(&config.root.display().to_string());
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "# lamina as containerd {}'s \"{PLUGIN}\" snapshotter: append to containerd's \
         config.toml,\n# whose first line must say {} (a new file: write `{}` first), then \
         restart\n# containerd. Generated by `lamina config containerd` from lamina's own \
         config.\n",
        series.name(),
        series.config_versions(),
        series.new_file_version(),
    );
    let _ = writeln!(
        s,
        "[proxy_plugins.{PLUGIN}]\n  type = \"snapshot\"\n  address = {address}"
    );
    let caps = capabilities(config, wanted);
    if !caps.is_empty() {
        let list: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
        let _ = writeln!(
            s,
            "  # remap-ids: lamina ID-maps user-namespaced containers' layers itself (kernel \
             5.19+);\n  # only-remap-ids: containerd must never copy and chown each layer \
             instead.\n  capabilities = [{}]",
            list.join(", ")
        );
    }
    if wanted.differ {
        if series == Series::V1_6 {
            return Err(Error::Config(
                "containerd 1.6 cannot use a differ of another process (1.7 added proxy \
                 differs): leave out --differ"
                    .into(),
            ));
        }
        let containerd = toml_string(&config.containerd_address.display().to_string());
        let _ = writeln!(
            s,
            "\n# lamina's differ: containerd hands it each layer to unpack into lamina, and \
             lamina reads\n# the layer from containerd at {containerd} (lamina's \
             containerd_address: it must be this\n# containerd's socket).\n\
             [proxy_plugins.{DIFF_PLUGIN}]\n  type = \"diff\"\n  address = {address}"
        );
    }
    if series != Series::V1_6 {
        let _ = writeln!(
            s,
            "  # CRI reports this path as the image filesystem (kubelet's image GC and \
             accounting);\n  # without it, CRI guesses a directory of containerd's that does \
             not exist.\n  [proxy_plugins.{PLUGIN}.exports]\n    root = {root}"
        );
    }
    if series == Series::V2 {
        let platform = toml_string(&wanted.platform);
        let _ = writeln!(
            s,
            "\n# containerd 2.x unpacks pulled and imported images only into the snapshotters \
             listed here\n# (CRI's pulls too, from 2.1). A list replaces containerd's default \
             one, so overlayfs is\n# listed again: drop its entry if no client uses it."
        );
        for snapshotter in [PLUGIN, "overlayfs"] {
            let _ = writeln!(
                s,
                "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \
                 {platform}\n  snapshotter = \"{snapshotter}\""
            );
            // Named, or containerd picks its default differ whenever more than one matches
            // the platform.
            let differ = if snapshotter == PLUGIN && wanted.differ {
                DIFF_PLUGIN
            } else {
                "walking"
            };
            if wanted.differ {
                let _ = writeln!(s, "  differ = \"{differ}\"");
            }
        }
    }
    if wanted.differ && series == Series::V1_7 {
        // Only 1.7: there, this list is the only way to name a differ. On 2.x the transfer
        // service's unpack_config names it (pulls, imports, CRI's); the list would also send
        // every client-side unpack (overlayfs' too) to lamina first, and fail them all while
        // lamina is down (Unavailable is not a code on which containerd tries the next).
        let _ = writeln!(
            s,
            "\n# containerd 1.7 tries each differ of this list in turn: lamina's answers \
             \"not implemented\"\n# for other snapshotters' mounts, and containerd then uses \
             its own. If config.toml\n# already has this table (`containerd config default` \
             prints it), set the key there instead.\n\
             [plugins.\"io.containerd.service.v1.diff-service\"]\n  default = \
             [\"{DIFF_PLUGIN}\", \"walking\"]"
        );
    }
    if wanted.cri {
        let table = match series {
            Series::V1_6 | Series::V1_7 => "plugins.\"io.containerd.grpc.v1.cri\".containerd",
            Series::V2 => "plugins.\"io.containerd.cri.v1.images\"",
        };
        let _ = writeln!(
            s,
            "\n# Kubernetes (CRI) unpacks images into lamina and runs containers on it. If \
             config.toml\n# already has this table (`containerd config default` prints it), \
             set the key there instead.\n[{table}]\n  snapshotter = \"{PLUGIN}\""
        );
    }
    Ok(s)
}

/// The platform containerd's transfer service unpacks for on this machine, in containerd's
/// spelling (`linux/amd64`, `linux/arm64/v8`).
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64/v8",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        super::super::resolve(Default::default(), &Default::default()).unwrap()
    }

    fn wanted(series: Series, cri: bool) -> Wanted {
        Wanted {
            series,
            cri,
            idmapped_mounts: true,
            platform: "linux/amd64".into(),
            differ: false,
        }
    }

    fn parse(text: &str) -> toml::Table {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_series_comes_from_what_containerd_prints() {
        let cases = [
            (
                "containerd github.com/containerd/containerd/v2 2.3.7+unknown",
                Series::V2,
            ),
            ("containerd containerd.io v2.4.2 abcdef", Series::V2),
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
                Series::V1_6,
            ),
            (
                "containerd github.com/containerd/containerd v1.7.29 0aa",
                Series::V1_7,
            ),
        ];
        for (out, series) in cases {
            assert_eq!(Series::from_version_output(out).unwrap(), series, "{out}");
        }
        for out in ["containerd", "containerd x 1.5.9", "containerd x 3.0.0"] {
            let err = Series::from_version_output(out).unwrap_err().to_string();
            assert!(err.contains("--containerd-version"), "{err}");
        }
        assert!(Series::from_name("1.8").is_err());
        assert_eq!(Series::from_name("2.4").unwrap(), Series::V2);
    }

    #[test]
    fn a_2x_fragment_registers_lamina_exports_its_root_and_lists_both_unpackers() {
        let c = config();
        let t = parse(&fragment(&c, &wanted(Series::V2, false)).unwrap());
        let lamina = &t["proxy_plugins"]["lamina"];
        assert_eq!(lamina["type"].as_str(), Some("snapshot"));
        assert_eq!(
            lamina["address"].as_str(),
            Some(c.address.to_str().unwrap())
        );
        assert_eq!(
            lamina["exports"]["root"].as_str(),
            Some(c.root.to_str().unwrap())
        );
        let caps: Vec<&str> = lamina["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(caps, ["remap-ids", "only-remap-ids"]);
        let unpack = t["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = unpack
            .iter()
            .map(|e| e["snapshotter"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["lamina", "overlayfs"]);
        assert!(unpack
            .iter()
            .all(|e| e["platform"].as_str() == Some("linux/amd64")));
        assert!(t["plugins"].get("io.containerd.cri.v1.images").is_none());
    }

    #[test]
    fn capabilities_follow_the_kernel_and_slow_chown() {
        let mut c = config();
        let mut w = wanted(Series::V2, false);
        w.idmapped_mounts = false;
        assert_eq!(capabilities(&c, &w), ["only-remap-ids"]);
        c.slow_chown = true;
        assert!(capabilities(&c, &w).is_empty());
        w.idmapped_mounts = true;
        assert_eq!(capabilities(&c, &w), ["remap-ids"]);
        w.series = Series::V1_7;
        assert!(capabilities(&c, &w).is_empty());
    }

    #[test]
    fn the_cri_key_is_where_each_config_version_has_it() {
        let c = config();
        let v2 = parse(&fragment(&c, &wanted(Series::V2, true)).unwrap());
        assert_eq!(
            v2["plugins"]["io.containerd.cri.v1.images"]["snapshotter"].as_str(),
            Some("lamina")
        );
        let v1 = parse(&fragment(&c, &wanted(Series::V1_6, true)).unwrap());
        assert_eq!(
            v1["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
            Some("lamina")
        );
    }

    #[test]
    fn a_16_fragment_has_only_what_16_reads() {
        let t = parse(&fragment(&config(), &wanted(Series::V1_6, false)).unwrap());
        let lamina = t["proxy_plugins"]["lamina"].as_table().unwrap();
        let keys: Vec<&str> = lamina.keys().map(String::as_str).collect();
        assert_eq!(keys, ["address", "type"]);
        assert!(!t.contains_key("plugins"));
        let t = parse(&fragment(&config(), &wanted(Series::V1_7, false)).unwrap());
        assert!(t["proxy_plugins"]["lamina"].get("exports").is_some());
        assert!(t["proxy_plugins"]["lamina"].get("capabilities").is_none());
    }

    #[test]
    fn paths_with_quotes_stay_valid_toml() {
        let mut c = config();
        c.root = "/var/lib/la\"mi\\na".into();
        let t = parse(&fragment(&c, &wanted(Series::V2, false)).unwrap());
        assert_eq!(
            t["proxy_plugins"]["lamina"]["exports"]["root"].as_str(),
            Some("/var/lib/la\"mi\\na")
        );
    }

    #[test]
    fn the_differ_is_registered_and_named_for_lamina_s_unpacks_only() {
        let c = config();
        let with_differ = |series| Wanted {
            differ: true,
            ..wanted(series, false)
        };
        let t = parse(&fragment(&c, &with_differ(Series::V2)).unwrap());
        let diff = &t["proxy_plugins"]["lamina-diff"];
        assert_eq!(diff["type"].as_str(), Some("diff"));
        assert_eq!(diff["address"].as_str(), Some("/run/lamina/lamina.sock"));
        let unpack = t["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            .as_array()
            .unwrap();
        let differs: Vec<(&str, &str)> = unpack
            .iter()
            .map(|u| {
                (
                    u["snapshotter"].as_str().unwrap(),
                    u["differ"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            differs,
            [("lamina", "lamina-diff"), ("overlayfs", "walking")]
        );
        // Not on 2.x: `containerd config default` has that table, and the fragment is appended.
        assert!(t["plugins"]
            .get("io.containerd.service.v1.diff-service")
            .is_none());

        let t = parse(&fragment(&c, &with_differ(Series::V1_7)).unwrap());
        assert_eq!(
            t["proxy_plugins"]["lamina-diff"]["type"].as_str(),
            Some("diff")
        );
        let list = &t["plugins"]["io.containerd.service.v1.diff-service"]["default"];
        assert_eq!(list.as_array().unwrap().len(), 2);
        assert_eq!(list[0].as_str(), Some("lamina-diff"));

        let err = fragment(&c, &with_differ(Series::V1_6)).unwrap_err();
        assert!(err.to_string().contains("1.6"), "{err}");
        // Without --differ, nothing of it.
        let t = parse(&fragment(&c, &wanted(Series::V2, false)).unwrap());
        assert!(t["proxy_plugins"].get("lamina-diff").is_none());
    }
}
