//! The node's configuration: `DATA/config.toml`, then environment variables
//! `ALKFS_<SECTION>_<KEY>` (e.g. `ALKFS_GC_KEEP_VERSIONS=3`), then `--set section.key=value`
//! flags, each overriding the one before. Unknown keys and wrong types are errors that name
//! the key, not silent defaults.

use std::path::Path;
use std::time::Duration;

use alknet_actors::gc::Retention;
use alknet_actors::node::NodeConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Default of `node.client_timeout_secs`.
pub const CLIENT_TIMEOUT_SECS_DEFAULT: u64 = 30;

/// The config file inside the data dir.
pub const CONFIG_FILE: &str = "config.toml";

/// Everything configurable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The node's actors.
    pub node: NodeSection,
    /// Garbage collection.
    pub gc: GcSection,
    /// Logging.
    pub log: LogSection,
    /// The network: where the node listens for peers, and its relay.
    pub net: NetSection,
}

/// `[net]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetSection {
    /// The address peers connect to (UDP, QUIC).
    pub listen: String,
    /// `default` (n0's public relays, for peers behind NAT), `disabled` (nothing leaves the
    /// listen address), or a relay URL.
    pub relay: String,
    /// `eager`: fetch the bytes of every version that arrives; `lazy`: only when read.
    pub fetch: String,
}

/// The port a node listens on by default.
pub const LISTEN_DEFAULT: &str = "0.0.0.0:4919";

impl Default for NetSection {
    fn default() -> Self {
        NetSection { listen: LISTEN_DEFAULT.into(), relay: "default".into(), fetch: "eager".into() }
    }
}

/// `[node]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Most commits in one transaction.
    pub batch_max: usize,
    /// Wait for more commits to batch, in ms (0: only what is queued).
    pub batch_delay_ms: u64,
    /// Fallback poll of the outbox watcher, in ms.
    pub outbox_poll_ms: u64,
    /// Bound of the blob queue.
    pub blob_queue_max: usize,
    /// Failures per child within the window before the node stops.
    pub restart_budget: u32,
    /// The restart budget's window, in seconds.
    pub restart_window_secs: u64,
    /// How long a control-socket client may stay silent: before its first request, and
    /// between the data frames of a streamed put (a stalled client is dropped, its staging
    /// file removed). Idle connections between requests get ten times as long.
    pub client_timeout_secs: u64,
    /// How far ahead of this machine's clock a version's stamp may be, in seconds: a peer's
    /// version stamped later waits (see `alkfs status`), and this node's clock never moves
    /// past it. An hour by default.
    pub clock_offset_max_secs: u64,
    /// The memory the shared buckets' documents may take, MiB (the least recently used are
    /// dropped past it and read back from tree.db when next used).
    pub doc_cache_mib: u64,
    /// A shared bucket's shards are compacted (a new epoch) once their saved size passes
    /// twice what the last epoch began with and at least this many KiB.
    pub compact_after_kib: u64,
}

/// `[gc]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GcSection {
    /// Seconds between scheduled collections (0: none).
    pub interval_secs: u64,
    /// Old versions kept per path.
    pub keep_versions: u32,
    /// Old versions younger than this are kept.
    pub keep_days: u32,
    /// Outbox consumers idle this many days expire; with none active, older events go.
    pub outbox_keep_days: u32,
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        let n = NodeConfig::default();
        Config {
            node: NodeSection {
                batch_max: n.batch_max,
                batch_delay_ms: n.batch_delay.as_millis() as u64,
                outbox_poll_ms: n.outbox_poll.as_millis() as u64,
                blob_queue_max: n.blob_queue_max,
                restart_budget: n.restart_budget,
                restart_window_secs: n.restart_window.as_secs(),
                client_timeout_secs: CLIENT_TIMEOUT_SECS_DEFAULT,
                clock_offset_max_secs: (n.clock_bound.ms / 1000) as u64,
                doc_cache_mib: (n.doc_budget >> 20) as u64,
                compact_after_kib: n.compact_after >> 10,
            },
            gc: GcSection {
                interval_secs: n.gc_interval.as_secs(),
                keep_versions: n.retention.keep_versions,
                keep_days: n.retention.keep_days,
                outbox_keep_days: n.retention.outbox_keep_days,
            },
            log: LogSection { format: "text".into() },
            net: NetSection::default(),
        }
    }
}

impl Default for NodeSection {
    fn default() -> Self {
        Config::default().node
    }
}
impl Default for GcSection {
    fn default() -> Self {
        Config::default().gc
    }
}
impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: "text".into() }
    }
}

impl Config {
    /// Loads the effective config of `dir`: file, then env, then `sets` (`section.key=value`).
    pub fn load(dir: &Path, sets: &[String]) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let mut table: toml::Table = match std::fs::read_to_string(&path) {
            Ok(text) => text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let keys = toml::Table::try_from(Config::default())?;
        for (section, fields) in &keys {
            let Some(fields) = fields.as_table() else { continue };
            for key in fields.keys() {
                let var = format!("ALKFS_{}_{}", section.to_uppercase(), key.to_uppercase());
                if let Ok(value) = std::env::var(&var) {
                    set(&mut table, section, key, &value).with_context(|| format!("in ${var}"))?;
                }
            }
        }
        for s in sets {
            let Some((name, value)) = s.split_once('=') else { bail!("--set {s}: expected section.key=value") };
            let Some((section, key)) = name.split_once('.') else { bail!("--set {s}: expected section.key=value") };
            set(&mut table, section, key, value).with_context(|| format!("in --set {s}"))?;
        }
        let config: Config = toml::Value::Table(table).try_into().with_context(|| format!("invalid configuration (file {}, env, --set)", path.display()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.node.batch_max == 0 || self.node.blob_queue_max == 0 || self.node.outbox_poll_ms == 0 || self.gc.outbox_keep_days == 0 {
            bail!("node.batch_max, node.blob_queue_max, node.outbox_poll_ms and gc.outbox_keep_days must be at least 1");
        }
        // Durations become timers and deadlines: bound them so none can overflow a clock.
        let bounds = [
            ("node.batch_delay_ms", self.node.batch_delay_ms, BATCH_DELAY_MS_MAX),
            ("node.outbox_poll_ms", self.node.outbox_poll_ms, POLL_MS_MAX),
            ("node.restart_window_secs", self.node.restart_window_secs, INTERVAL_SECS_MAX),
            ("node.client_timeout_secs", self.node.client_timeout_secs, INTERVAL_SECS_MAX),
            ("node.clock_offset_max_secs", self.node.clock_offset_max_secs, INTERVAL_SECS_MAX),
            ("node.doc_cache_mib", self.node.doc_cache_mib, DOC_CACHE_MIB_MAX),
            ("node.compact_after_kib", self.node.compact_after_kib, COMPACT_AFTER_KIB_MAX),
            ("gc.interval_secs", self.gc.interval_secs, INTERVAL_SECS_MAX),
            ("gc.keep_days", u64::from(self.gc.keep_days), DAYS_MAX),
            ("gc.outbox_keep_days", u64::from(self.gc.outbox_keep_days), DAYS_MAX),
        ];
        for (key, value, max) in bounds {
            if value > max {
                bail!("{key} = {value} is too large: the most is {max}");
            }
        }
        if self.node.client_timeout_secs == 0 || self.node.clock_offset_max_secs == 0 {
            bail!("node.client_timeout_secs and node.clock_offset_max_secs must be at least 1");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\", not {:?}", self.log.format);
        }
        self.net_config()?;
        Ok(())
    }

    /// Where the node listens and its relay, checked.
    pub fn net_config(&self) -> Result<alknet_actors::node::mesh::NetConfig> {
        let listen = self.net.listen.parse().with_context(|| format!("net.listen = {:?} is not an address like 0.0.0.0:4919", self.net.listen))?;
        let relay = match self.net.relay.as_str() {
            "disabled" => None,
            "default" => Some(None),
            url if url.starts_with("https://") || url.starts_with("http://") => Some(Some(url.to_string())),
            other => bail!("net.relay = {other:?}: give default, disabled, or a relay URL (https://…)"),
        };
        let eager_fetch = match self.net.fetch.as_str() {
            "eager" => true,
            "lazy" => false,
            other => bail!("net.fetch = {other:?}: give eager or lazy"),
        };
        Ok(alknet_actors::node::mesh::NetConfig { listen, relay, eager_fetch })
    }

    /// The retention policy configured for collections.
    pub fn retention(&self) -> Retention {
        Retention { keep_versions: self.gc.keep_versions, keep_days: self.gc.keep_days, outbox_keep_days: self.gc.outbox_keep_days }
    }

    /// The actors' tunables.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            batch_max: self.node.batch_max,
            batch_delay: Duration::from_millis(self.node.batch_delay_ms),
            gc_interval: Duration::from_secs(self.gc.interval_secs),
            retention: self.retention(),
            outbox_poll: Duration::from_millis(self.node.outbox_poll_ms),
            blob_queue_max: self.node.blob_queue_max,
            restart_budget: self.node.restart_budget,
            restart_window: Duration::from_secs(self.node.restart_window_secs),
            clock_bound: self.clock_bound(),
            doc_budget: (self.node.doc_cache_mib as usize) << 20,
            compact_after: self.node.compact_after_kib << 10,
        }
    }

    /// How far ahead of the wall clock a version's stamp may be (`node.clock_offset_max_secs`).
    pub fn clock_bound(&self) -> alknet_actors::proto::clock::Bound {
        alknet_actors::proto::clock::Bound { ms: self.node.clock_offset_max_secs as i64 * 1000 }
    }
}

/// Longest wait for more commits to batch: beyond a few seconds writes just stall.
pub const BATCH_DELAY_MS_MAX: u64 = 10_000;
/// Longest outbox fallback poll.
pub const POLL_MS_MAX: u64 = 3_600_000;
/// Longest interval or window in seconds (a year).
pub const INTERVAL_SECS_MAX: u64 = 366 * 86_400;
/// The largest document budget, MiB (1 TiB: beyond any machine this runs on).
pub const DOC_CACHE_MIB_MAX: u64 = 1 << 20;

/// The largest `node.compact_after_kib` (1 TiB).
pub const COMPACT_AFTER_KIB_MAX: u64 = 1 << 30;
/// Longest retention in days (a hundred years).
pub const DAYS_MAX: u64 = 36_600;

/// Sets `section.key` to `raw`, read as TOML (a number, a bool, a quoted string) or else as a
/// bare string.
fn set(table: &mut toml::Table, section: &str, key: &str, raw: &str) -> Result<()> {
    let value = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section_table) = entry.as_table_mut() else { bail!("{section} is not a section") };
    section_table.insert(key.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_flags_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "[gc]\nkeep_versions = 3\ninterval_secs = 10\n").unwrap();
        let c = Config::load(dir.path(), &["gc.interval_secs=20".into(), "log.format=json".into()]).unwrap();
        assert_eq!((c.gc.keep_versions, c.gc.interval_secs, c.log.format.as_str()), (3, 20, "json"));
        assert_eq!(c.node, NodeSection::default());
        let err = Config::load(dir.path(), &["gc.nope=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
        let err = Config::load(dir.path(), &["gc.keep_days=many".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("keep_days"), "{err:#}");
    }

    #[test]
    fn durations_that_would_overflow_a_clock_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        for set in ["node.batch_delay_ms=9223372036854775807", "gc.interval_secs=9223372036854775807", "node.restart_window_secs=99999999999"] {
            let err = format!("{:#}", Config::load(dir.path(), &[set.into()]).unwrap_err());
            let key = set.split('=').next().unwrap();
            assert!(err.contains(&format!("{key} = ")) && err.contains("too large"), "{set}: {err}");
        }
        // Past what TOML's integers hold, the value is refused as the wrong type, by name.
        let err = format!("{:#}", Config::load(dir.path(), &["node.batch_delay_ms=18446744073709551615".into()]).unwrap_err());
        assert!(err.contains("node.batch_delay_ms"), "{err}");
        let ok = Config::load(dir.path(), &[format!("node.batch_delay_ms={BATCH_DELAY_MS_MAX}")]).unwrap();
        assert_eq!(ok.node_config().batch_delay, Duration::from_millis(BATCH_DELAY_MS_MAX));
    }
}
