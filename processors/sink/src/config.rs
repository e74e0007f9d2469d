//! The `scylla:` section of topology.yaml, parsed and validated into [`SinkConfig`].
//!
//! Validation is pure (no I/O): a bad keyspace name, a zero concurrency or an unknown
//! consistency fails at start-up naming the key. Credentials and TLS are resolved from this
//! section and the environment in [`crate::security`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use scylla::statement::Consistency;
use serde::Deserialize;
use streamoasis_pipeline::topology::{ConfigError, Topology};

/// The `scylla:` section of topology.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Keyspace holding the tables.
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// Replication map for `CREATE KEYSPACE`, e.g. `{class: SimpleStrategy, replication_factor: 1}`.
    #[serde(default = "default_replication")]
    pub replication: HashMap<String, serde_yaml::Value>,
    /// Most concurrent write requests per sink replica.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout; timed-out writes are retried with backoff.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Write consistency: `ONE`, `LOCAL_QUORUM`, `QUORUM`, ...
    #[serde(default = "default_consistency")]
    pub consistency: String,
    /// Role to log in as (PasswordAuthenticator). `SCYLLA_USERNAME` overrides it.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the role's password (a mounted Secret). `SCYLLA_PASSWORD` or
    /// `SCYLLA_PASSWORD_FILE` override it. A password never goes into this file itself.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Client-to-node TLS.
    #[serde(default)]
    pub tls: CqlTlsConfig,
    /// Floats in the model's embedding (384 for the default MiniLM-L6): the size of the
    /// `media_embeddings.pooled` vector column the similar-media and search routes read through
    /// the database's ANN index. 0: no vector column.
    #[serde(default = "default_vector_dim")]
    pub vector_dim: usize,
}

/// `scylla.tls`: client-to-node encryption. `SCYLLA_CA` (a PEM file) sets `ca` and turns TLS on;
/// `SCYLLA_CLIENT_CERT` / `SCYLLA_CLIENT_KEY` set the client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CqlTlsConfig {
    /// Use TLS (implied by `ca`, `cert` or `SCYLLA_CA`).
    #[serde(default)]
    pub enabled: bool,
    /// PEM CA bundle that signed the nodes' certificates (default: the system's roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for clusters that require one (`require_client_auth`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Check that the node's certificate names the address connected to. On by default; turn
    /// off only for nodes whose certificates lack their IPs (the chain is still verified).
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

impl Default for CqlTlsConfig {
    fn default() -> Self {
        CqlTlsConfig { enabled: false, ca: None, cert: None, key: None, verify_hostname: true }
    }
}

fn yes() -> bool {
    true
}

fn default_keyspace() -> String {
    "streamoasis".into()
}
fn default_replication() -> HashMap<String, serde_yaml::Value> {
    HashMap::from([("class".into(), "SimpleStrategy".into()), ("replication_factor".into(), 1.into())])
}
fn default_concurrency() -> usize {
    64
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_vector_dim() -> usize {
    384
}
fn default_consistency() -> String {
    "LOCAL_QUORUM".into()
}

/// The driver's consistency for a name such as `LOCAL_QUORUM` (any case); `None` if unknown.
pub(crate) fn consistency(s: &str) -> Option<Consistency> {
    Some(match s.to_ascii_uppercase().as_str() {
        "ANY" => Consistency::Any,
        "ONE" => Consistency::One,
        "TWO" => Consistency::Two,
        "THREE" => Consistency::Three,
        "QUORUM" => Consistency::Quorum,
        "ALL" => Consistency::All,
        "LOCAL_QUORUM" => Consistency::LocalQuorum,
        "EACH_QUORUM" => Consistency::EachQuorum,
        "LOCAL_ONE" => Consistency::LocalOne,
        _ => return None,
    })
}

impl SinkConfig {
    /// Parse and validate the `scylla:` section.
    pub fn from_topology(t: &Topology) -> Result<Self, ConfigError> {
        let c: SinkConfig = t.section("scylla", &t.file.scylla)?;
        let origin = t.path.display().to_string();
        let err = |k: &str, m: String| Err(ConfigError::new(format!("{origin}: scylla.{k}"), m));
        if c.keyspace.is_empty() || !c.keyspace.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            return err("keyspace", format!("'{}' must be letters, digits and underscores", c.keyspace));
        }
        if c.concurrency == 0 {
            return err("concurrency", "must be >= 1".into());
        }
        if consistency(&c.consistency).is_none() {
            return err("consistency", format!("'{}' is not a CQL consistency (ONE, LOCAL_QUORUM, QUORUM, ...)", c.consistency));
        }
        if c.vector_dim > 8192 {
            return err(
                "vector_dim",
                format!("{} is beyond the 8192 floats a CQL vector column holds here; set the model's embedding size (384 for MiniLM-L6), or 0 for no vector column", c.vector_dim),
            );
        }
        if !c.replication.contains_key("class") {
            return err("replication", "needs a class (SimpleStrategy or NetworkTopologyStrategy)".into());
        }
        Ok(c)
    }
}
