//! # streamoasis-sink
//!
//! Writes `media.tagged` events into ScyllaDB (any CQL database: tests run on Cassandra 5).
//!
//! ## Layout
//! - [`SinkConfig`]: the `scylla:` section of topology.yaml.
//! - [`CqlSecurity`]: credentials and TLS of the CQL session (topology + environment / files).
//! - [`schema`]: keyspace and tables (`media_tags`, `media_by_tag`), created idempotently.
//! - [`TagWriter`]: prepared statements (prepared once), bounded concurrency, idempotent upserts.
//! - [`SinkProcessor`]: the pipeline processor around the writer.
//! - [`read`]: the read path the API serves (one item's tags; items by tag, best first, paged).
//!
//! ## `media_by_tag`: bounded partitions
//! `PRIMARY KEY ((tag, bucket), score, media_id)`, clustered best first. `bucket` is a stable
//! hash of the media id modulo [`BY_TAG_BUCKETS`], so a popular tag spreads over that many
//! partitions instead of one that grows without bound, and a page is a merge of the heads of
//! every bucket (see [`read`]). `topology apply` migrates the earlier one-partition-per-tag
//! layout: it drops that table, creates this one and rebuilds it from `media_tags`.
//!
//! ## Idempotence and ordering: the newest input wins
//! The version of a write comes from the input record, never from a processor's clock:
//! `(ingested_at, source partition, source offset)` of the `media.ingested` record the tags were
//! computed from (carried in the tagged event's `ingested_at` and `lineage`). Every write carries
//! `USING TIMESTAMP ingested_at × 1000 + source offset mod 1000` (µs), so the newest version wins
//! whatever the order of arrival; an event whose version is older than the stored row's is skipped
//! (a replay, or a late older event), so its tags never reappear in `media_by_tag`. Tags an item
//! no longer carries are deleted from `media_by_tag` with the same timestamp. The run loop
//! completes records with the same key in partition order, so one item's events are never
//! written concurrently by one sink.
//!
//! ## Errors
//! A write the database rejects as invalid (e.g. a key over 64 KiB) is poison (`db_rejected`,
//! to the DLQ); not authorised is fatal; unavailable, timeouts and overload are transient.
//!
//! ## ScyllaDB notes
//! The driver is shard-aware against ScyllaDB automatically (token- and shard-aware routing, no
//! configuration). Nothing here is Scylla-only. For production use `NetworkTopologyStrategy`
//! with replication 3 and `LOCAL_QUORUM` (set under `scylla:` in topology.yaml).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use serde::Deserialize;
use streamoasis_pipeline::error::{limits, ErrorKind};
use streamoasis_pipeline::events::MediaTagged;
use streamoasis_pipeline::processor::{ProcessError, Processor, RecordMeta};
use streamoasis_pipeline::secret::{self, Secret};
use streamoasis_pipeline::topology::{ConfigError, Topology};
use tokio::sync::Semaphore;

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

/// Environment variables read by [`CqlSecurity::resolve`].
pub mod env {
    /// Role name.
    pub const USERNAME: &str = "SCYLLA_USERNAME";
    /// Password (or `SCYLLA_PASSWORD_FILE`).
    pub const PASSWORD: &str = "SCYLLA_PASSWORD";
    /// PEM CA file; turns TLS on.
    pub const CA: &str = "SCYLLA_CA";
    /// Client certificate (PEM).
    pub const CLIENT_CERT: &str = "SCYLLA_CLIENT_CERT";
    /// Client key (PEM).
    pub const CLIENT_KEY: &str = "SCYLLA_CLIENT_KEY";
}

/// Credentials and TLS of a CQL session, resolved from the `scylla:` section and the
/// environment. `Debug` hides the password.
#[derive(Debug, Clone, Default)]
pub struct CqlSecurity {
    /// Role to log in as; `None` connects without credentials.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<Secret>,
    /// TLS settings; `None` is plaintext.
    pub tls: Option<CqlTlsConfig>,
}

impl CqlSecurity {
    /// Topology settings, overridden by `SCYLLA_USERNAME`, `SCYLLA_PASSWORD` (or `_FILE`),
    /// `SCYLLA_CA`, `SCYLLA_CLIENT_CERT`, `SCYLLA_CLIENT_KEY`. Reads the password file.
    pub fn resolve(c: &SinkConfig) -> Result<Self, ConfigError> {
        let username = secret::var(env::USERNAME).or_else(|| c.username.clone());
        let password = match secret::from_env(env::PASSWORD)? {
            Some(p) => Some(p),
            None => match &c.password_file {
                Some(f) => Some(secret::read_file(f, "scylla.password_file")?),
                None => None,
            },
        };
        if username.is_some() != password.is_some() {
            let (have, missing) = if username.is_some() { ("a user", "SCYLLA_PASSWORD, SCYLLA_PASSWORD_FILE or scylla.password_file") } else { ("a password", "SCYLLA_USERNAME or scylla.username") };
            return Err(ConfigError::new("scylla.username", format!("{have} is set but not its pair: set {missing}")));
        }
        let mut tls = c.tls.clone();
        if let Some(ca) = secret::var(env::CA) {
            tls.ca = Some(PathBuf::from(ca));
        }
        if let Some(v) = secret::var(env::CLIENT_CERT) {
            tls.cert = Some(PathBuf::from(v));
        }
        if let Some(v) = secret::var(env::CLIENT_KEY) {
            tls.key = Some(PathBuf::from(v));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(ConfigError::new("scylla.tls.cert", "set both scylla.tls.cert and scylla.tls.key (or SCYLLA_CLIENT_CERT and SCYLLA_CLIENT_KEY), or neither"));
        }
        for (key, p) in [("scylla.tls.ca (SCYLLA_CA)", &tls.ca), ("scylla.tls.cert", &tls.cert), ("scylla.tls.key", &tls.key)] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(ConfigError::new(key, format!("'{}' is not a readable file", p.display())));
                }
            }
        }
        let on = tls.enabled || tls.ca.is_some() || tls.cert.is_some();
        Ok(CqlSecurity { username, password, tls: on.then_some(tls) })
    }
}

/// An OpenSSL client context for the CQL session: the CA (added to the system roots), the
/// optional client certificate, peer verification always on, host-name check as configured.
fn tls_context(t: &CqlTlsConfig) -> Result<openssl::ssl::SslConnectorBuilder, anyhow::Error> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
    let path = |p: &Path| p.display().to_string();
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    if let Some(ca) = &t.ca {
        b.set_ca_file(ca).map_err(|e| anyhow::anyhow!("scylla.tls.ca {}: {e}", path(ca)))?;
    }
    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
        b.set_certificate_chain_file(cert).map_err(|e| anyhow::anyhow!("scylla.tls.cert {}: {e}", path(cert)))?;
        b.set_private_key_file(key, SslFiletype::PEM).map_err(|e| anyhow::anyhow!("scylla.tls.key {}: {e}", path(key)))?;
        b.check_private_key().map_err(|e| anyhow::anyhow!("scylla.tls.key does not match scylla.tls.cert: {e}"))?;
    }
    if !t.verify_hostname {
        // The chain is still verified; only a name/IP mismatch (X509_V_ERR_HOSTNAME_MISMATCH 62,
        // X509_V_ERR_IP_ADDRESS_MISMATCH 64) is let through.
        b.set_verify_callback(SslVerifyMode::PEER, |ok, ctx| ok || matches!(ctx.error().as_raw(), 62 | 64));
    }
    Ok(b)
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
fn default_consistency() -> String {
    "LOCAL_QUORUM".into()
}

fn consistency(s: &str) -> Option<Consistency> {
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
        if !c.replication.contains_key("class") {
            return err("replication", "needs a class (SimpleStrategy or NetworkTopologyStrategy)".into());
        }
        Ok(c)
    }
}

/// Keyspace and tables.
pub mod schema {
    use super::*;

    /// CQL statements creating the keyspace and tables (idempotent).
    pub fn statements(c: &SinkConfig) -> Vec<String> {
        let mut repl: Vec<String> = c
            .replication
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
                };
                format!("'{k}': '{v}'")
            })
            .collect();
        repl.sort();
        let ks = &c.keyspace;
        vec![
            format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{}}}", repl.join(", ")),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.media_tags (\
                 media_id text PRIMARY KEY, \
                 tags map<text, float>, \
                 top_tag text, \
                 kind text, \
                 strategy text, \
                 model text, \
                 ingested_at timestamp, \
                 tagged_at timestamp, \
                 source_topic text, source_partition int, source_offset bigint)"
            ),
            by_tag_table(ks),
        ]
    }

    /// The bucketed by-tag table (see the crate docs).
    pub fn by_tag_table(ks: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.media_by_tag (\
             tag text, bucket int, score float, media_id text, tagged_at timestamp, \
             PRIMARY KEY ((tag, bucket), score, media_id)) \
             WITH CLUSTERING ORDER BY (score DESC, media_id DESC)"
        )
    }

    /// Columns added to `media_tags` after its first release: `ALTER TABLE ... ADD` when absent.
    pub const CARRIED_COLUMNS: [(&str, &str); 4] = [("title", "text"), ("source", "text"), ("language", "text"), ("attributes", "map<text, text>")];

    async fn columns(session: &Session, ks: &str, table: &str) -> anyhow::Result<HashSet<String>> {
        let r = session
            .query_unpaged("SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?", (ks, table))
            .await?
            .into_rows_result()?;
        Ok(r.rows::<(String,)>()?.collect::<Result<Vec<_>, _>>()?.into_iter().map(|(c,)| c).collect())
    }

    /// Create the keyspace and tables, add missing columns and migrate an unbucketed
    /// `media_by_tag` (rebuilt from `media_tags`). Idempotent; returns what it changed.
    pub async fn apply(session: &Session, c: &SinkConfig) -> anyhow::Result<Vec<String>> {
        let ks = &c.keyspace;
        let mut changes = Vec::new();
        let stmts = statements(c);
        session.query_unpaged(stmts[0].clone(), ()).await?;
        session.query_unpaged(stmts[1].clone(), ()).await?;
        let have = columns(session, ks, "media_tags").await?;
        for (name, ty) in CARRIED_COLUMNS {
            if !have.contains(name) {
                session.query_unpaged(format!("ALTER TABLE {ks}.media_tags ADD {name} {ty}"), ()).await?;
                changes.push(format!("added     column media_tags.{name}"));
            }
        }
        let by_tag = columns(session, ks, "media_by_tag").await?;
        let migrate = !by_tag.is_empty() && !by_tag.contains("bucket");
        if migrate {
            session.query_unpaged(format!("DROP TABLE {ks}.media_by_tag"), ()).await?;
        }
        session.query_unpaged(by_tag_table(ks), ()).await?;
        if migrate {
            let n = crate::read::rebuild_by_tag(session, ks).await?;
            changes.push(format!("migrated  {ks}.media_by_tag to (tag, bucket) partitions: {n} rows rebuilt from media_tags"));
        }
        Ok(changes)
    }
}

/// Partitions per tag in `media_by_tag` (a hash of the media id picks one). Changing it needs a
/// rebuild of the table: drop it and run `topology apply`.
pub const BY_TAG_BUCKETS: i32 = 16;

/// The `media_by_tag` bucket of a media id: FNV-1a of its bytes, stable across releases.
pub fn bucket_of(media_id: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in media_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % BY_TAG_BUCKETS as u32) as i32
}

pub mod read;

/// Connect to the cluster at `uri` (host:port[,host:port...]) with the credentials and TLS of
/// the `scylla:` section and the environment ([`CqlSecurity::resolve`]).
pub async fn connect(uri: &str, c: &SinkConfig) -> anyhow::Result<Session> {
    connect_with(uri, c, &CqlSecurity::resolve(c)?).await
}

/// Connect with explicit credentials and TLS.
pub async fn connect_with(uri: &str, c: &SinkConfig, sec: &CqlSecurity) -> anyhow::Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(consistency(&c.consistency).unwrap_or(Consistency::LocalQuorum))
        .request_timeout(Some(c.request_timeout))
        .build();
    let nodes: Vec<&str> = uri.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut b = SessionBuilder::new()
        .known_nodes(&nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_secs(10));
    if let (Some(user), Some(pass)) = (&sec.username, &sec.password) {
        b = b.user(user.as_str(), pass.expose());
    }
    if let Some(t) = &sec.tls {
        b = b.tls_context(Some(tls_context(t)?));
    }
    tracing::debug!(uri, user = ?sec.username, tls = sec.tls.is_some(), "connecting to the CQL database");
    b.build().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the CQL database at {uri} as {} over {} ({e}); start it with `scripts/stack up`, set SCYLLA_URI, and check SCYLLA_USERNAME / SCYLLA_PASSWORD / SCYLLA_CA",
            sec.username.as_deref().unwrap_or("no user"),
            if sec.tls.is_some() { "TLS" } else { "plaintext" }
        )
    })
}

/// Writes tagged events with prepared statements and bounded concurrency.
pub struct TagWriter {
    session: Arc<Session>,
    upsert: PreparedStatement,
    read_tags: PreparedStatement,
    by_tag: PreparedStatement,
    unlink: PreparedStatement,
    carry: PreparedStatement,
    permits: Semaphore,
}

impl std::fmt::Debug for TagWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagWriter").finish_non_exhaustive()
    }
}

/// Why a write failed, classified for the run loop.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The database refuses this data (invalid request, value too large): retrying cannot help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The database is unavailable, overloaded or timed out: retry with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Not authorised, or our statements are wrong: a deployment problem.
    #[error("{0}")]
    Fatal(String),
}

/// Classify a driver error (see the module docs).
pub fn classify(what: &str, e: &scylla::errors::ExecutionError) -> WriteError {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    let msg = format!("{what}: {e}");
    match e {
        ExecutionError::BadQuery(_) => WriteError::Rejected(msg),
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => match db {
            DbError::Invalid | DbError::FunctionFailure { .. } => WriteError::Rejected(msg),
            DbError::Unauthorized | DbError::AuthenticationError => {
                WriteError::Fatal(format!("{msg} (grant MODIFY and SELECT on the keyspace to the sink's role)"))
            }
            DbError::SyntaxError | DbError::ConfigError => WriteError::Fatal(format!("{msg} (did `streamoasis topology apply` run?)")),
            _ => WriteError::Unavailable(msg),
        },
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => WriteError::Rejected(msg),
        _ => WriteError::Unavailable(msg),
    }
}

/// The version of an event: from the input record, never from a clock. Ordered tuples compare
/// as the rule in the module docs says.
pub fn version_of(e: &MediaTagged) -> (i64, i32, i64) {
    (e.ingested_at, e.lineage.partition, e.lineage.offset)
}

/// The CQL write timestamp (µs) of an event's version.
pub fn write_timestamp(e: &MediaTagged) -> i64 {
    e.ingested_at.saturating_mul(1000).saturating_add(e.lineage.offset.rem_euclid(1000))
}

struct DbMetrics {
    write: prometheus::Histogram,
    errors: prometheus::IntCounterVec,
    skipped: prometheus::IntCounter,
}

fn db_metrics() -> &'static DbMetrics {
    static M: std::sync::OnceLock<DbMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let r = streamoasis_pipeline::telemetry::registry();
        let m = DbMetrics {
            write: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("streamoasis_db_write_seconds", "Time to write one tagged event (all its rows)")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .unwrap(),
            errors: prometheus::IntCounterVec::new(prometheus::Opts::new("streamoasis_db_errors_total", "Failed database writes, by class"), &["class"]).unwrap(),
            skipped: prometheus::IntCounter::new("streamoasis_db_stale_skipped_total", "Events skipped because the stored row is newer").unwrap(),
        };
        let _ = r.register(Box::new(m.write.clone()));
        let _ = r.register(Box::new(m.errors.clone()));
        let _ = r.register(Box::new(m.skipped.clone()));
        m
    })
}

impl TagWriter {
    /// Prepare the statements (once).
    pub async fn new(session: Arc<Session>, c: &SinkConfig) -> anyhow::Result<Self> {
        let ks = &c.keyspace;
        let prep = |q: String| {
            let session = session.clone();
            async move { session.prepare(q.clone()).await.map_err(|e| anyhow::anyhow!("preparing `{q}`: {e} (did `streamoasis topology apply` run?)")) }
        };
        Ok(TagWriter {
            upsert: prep(format!(
                "INSERT INTO {ks}.media_tags (media_id, tags, top_tag, kind, strategy, model, ingested_at, tagged_at, source_topic, source_partition, source_offset) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            read_tags: prep(format!("SELECT tags, ingested_at, source_partition, source_offset FROM {ks}.media_tags WHERE media_id = ?")).await?,
            by_tag: prep(format!("INSERT INTO {ks}.media_by_tag (tag, bucket, score, media_id, tagged_at) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            unlink: prep(format!("DELETE FROM {ks}.media_by_tag USING TIMESTAMP ? WHERE tag = ? AND bucket = ? AND score = ? AND media_id = ?")).await?,
            carry: prep(format!("UPDATE {ks}.media_tags USING TIMESTAMP ? SET title = ?, source = ?, language = ?, attributes = ? WHERE media_id = ?")).await?,
            permits: Semaphore::new(c.concurrency),
            session,
        })
    }

    /// Upsert one event: the item row, one row per tag, and deletes for tags it no longer has.
    /// Returns `false` when the stored row is newer and the event was skipped.
    pub async fn write(&self, e: &MediaTagged) -> Result<bool, WriteError> {
        let started = std::time::Instant::now();
        let r = tracing::Instrument::instrument(self.write_inner(e), tracing::info_span!("db_write")).await;
        let m = db_metrics();
        m.write.observe(started.elapsed().as_secs_f64());
        match &r {
            Ok(false) => m.skipped.inc(),
            Ok(true) => {}
            Err(WriteError::Rejected(_)) => m.errors.with_label_values(&["rejected"]).inc(),
            Err(WriteError::Unavailable(_)) => m.errors.with_label_values(&["unavailable"]).inc(),
            Err(WriteError::Fatal(_)) => m.errors.with_label_values(&["fatal"]).inc(),
        }
        r
    }

    async fn write_inner(&self, e: &MediaTagged) -> Result<bool, WriteError> {
        let _permit = self.permits.acquire().await.map_err(|e| WriteError::Fatal(e.to_string()))?;
        let ts_us = write_timestamp(e);
        let read = |x: &dyn std::fmt::Display| WriteError::Unavailable(format!("read previous tags: {x}"));
        type Stored = (Option<HashMap<String, f32>>, Option<CqlTimestamp>, Option<i32>, Option<i64>);
        let stored = self
            .session
            .execute_unpaged(&self.read_tags, (&e.media_id,))
            .await
            .map_err(|x| classify("read previous tags", &x))?
            .into_rows_result()
            .map_err(|x| read(&x))?
            .maybe_first_row::<Stored>()
            .map_err(|x| read(&x))?;
        if let Some((_, Some(CqlTimestamp(at)), part, off)) = &stored {
            if (*at, part.unwrap_or(-1), off.unwrap_or(-1)) > version_of(e) {
                // A replay or a late, older event: the stored tags are newer and stay.
                return Ok(false);
            }
        }
        let previous: HashMap<String, f32> = stored.and_then(|(m, ..)| m).unwrap_or_default();
        let tags: HashMap<String, f32> = e.tags.iter().map(|t| (t.label.clone(), t.score)).collect();
        let tagged_at = CqlTimestamp(e.tagged_at);
        let top = e.tags.first().map(|t| t.label.clone());
        let kind = format!("{:?}", e.kind).to_uppercase();
        let strategy = format!("{:?}", e.strategy).to_uppercase();
        let model = format!("{}@{}", e.model.name, e.model.version);
        let main = self.session.execute_unpaged(
            &self.upsert,
            (
                &e.media_id,
                &tags,
                &top,
                &kind,
                &strategy,
                &model,
                CqlTimestamp(e.ingested_at),
                tagged_at,
                &e.lineage.topic,
                e.lineage.partition,
                e.lineage.offset,
                ts_us,
            ),
        );
        // media_by_tag rows are keyed by (tag, bucket, score, media_id): a tag whose score
        // changed moves to a new row, so the old row is deleted like a dropped tag.
        let bucket = bucket_of(&e.media_id);
        let links = e.tags.iter().map(|t| self.session.execute_unpaged(&self.by_tag, (&t.label, bucket, t.score, &e.media_id, tagged_at, ts_us)));
        let unlinks = previous
            .iter()
            .filter(|(l, s)| tags.get(*l).is_none_or(|n| n.to_bits() != s.to_bits()))
            .map(|(l, s)| self.session.execute_unpaged(&self.unlink, (ts_us, l, bucket, *s, &e.media_id)));
        // Fields carried from the input (title, source, language, attributes), for the read path.
        let carry = self.session.execute_unpaged(&self.carry, (ts_us, &e.title, &e.source, &e.language, &e.attributes, &e.media_id));
        let (main, links, unlinks, carry) = tokio::join!(main, futures::future::join_all(links), futures::future::join_all(unlinks), carry);
        main.map_err(|x| classify("write media_tags", &x))?;
        carry.map_err(|x| classify("write media_tags", &x))?;
        for r in links.into_iter().chain(unlinks) {
            r.map_err(|x| classify("write media_by_tag", &x))?;
        }
        Ok(true)
    }
}

/// The sink processor: `media.tagged` → ScyllaDB. Emits nothing.
#[derive(Debug, Clone)]
pub struct SinkProcessor {
    writer: Arc<TagWriter>,
}

impl SinkProcessor {
    /// Wrap a writer.
    pub fn new(writer: Arc<TagWriter>) -> Self {
        SinkProcessor { writer }
    }
}

impl Processor for SinkProcessor {
    type Input = MediaTagged;
    type Output = MediaTagged;

    fn name(&self) -> &'static str {
        "sink"
    }

    async fn process(&self, e: MediaTagged, _meta: RecordMeta) -> Result<Vec<MediaTagged>, ProcessError> {
        if e.media_id.trim().is_empty() {
            return Err(ProcessError::poison(ErrorKind::InvalidField, "media_id is empty"));
        }
        if e.media_id.len() > limits::MAX_MEDIA_ID_BYTES {
            return Err(ProcessError::poison(ErrorKind::MediaIdTooLong, format!("media_id is {} bytes, over {}", e.media_id.len(), limits::MAX_MEDIA_ID_BYTES)));
        }
        if let Some(t) = e.tags.iter().find(|t| !t.score.is_finite() || t.label.is_empty()) {
            return Err(ProcessError::poison(ErrorKind::InvalidField, format!("tag '{}' has score {}", t.label, t.score)));
        }
        // Unavailable: the run loop retries with backoff while the in-flight limit pauses the
        // partitions, so nothing is dropped and memory stays bounded.
        match self.writer.write(&e).await {
            Ok(_) => Ok(Vec::new()),
            Err(WriteError::Rejected(m)) => Err(ProcessError::poison(ErrorKind::DbRejected, m)),
            Err(WriteError::Unavailable(m)) => Err(ProcessError::Transient(m)),
            Err(WriteError::Fatal(m)) => Err(ProcessError::Fatal(m)),
        }
    }
}

/// Run the sink processor as `streamoasis sink` does (the one wiring path: the command and the
/// tests call this): `processors.sink` and `kafka.client` from the topology, until `shutdown`.
pub async fn serve(
    topo: &Topology,
    brokers: &str,
    codec: Arc<streamoasis_pipeline::codec::Codec>,
    writer: Arc<TagWriter>,
    health: Option<Arc<streamoasis_pipeline::telemetry::Health>>,
    shutdown: streamoasis_pipeline::CancellationToken,
) -> anyhow::Result<streamoasis_pipeline::kafka::RunSummary> {
    let mut runner = streamoasis_pipeline::kafka::RunnerConfig::new(brokers, topo.file.processors.sink.clone(), topo.file.kafka.client.clone());
    if let Some(h) = health {
        runner = runner.with_health(h);
    }
    streamoasis_pipeline::kafka::run(runner, codec, Arc::new(SinkProcessor::new(writer)), shutdown).await
}

/// Read helpers for operators and tests.
pub async fn count_rows(session: &Session, query: &str) -> anyhow::Result<i64> {
    let r = session.query_unpaged(query, ()).await?.into_rows_result()?;
    Ok(r.maybe_first_row::<(i64,)>()?.map_or(0, |(n,)| n))
}

/// Tags of one item, highest score first; `None` when the item has no row.
pub async fn get_tags(session: &Session, keyspace: &str, media_id: &str) -> anyhow::Result<Option<Vec<(String, f32)>>> {
    let q = format!("SELECT tags FROM {keyspace}.media_tags WHERE media_id = ?");
    let r = session.query_unpaged(q, (media_id,)).await?.into_rows_result()?;
    Ok(r.maybe_first_row::<(Option<HashMap<String, f32>>,)>()?.map(|(m,)| {
        let mut v: Vec<(String, f32)> = m.unwrap_or_default().into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }))
}

/// Items carrying `tag`, highest score first (the first page of [`read::Reader::by_tag`]).
pub async fn by_tag(session: &Session, keyspace: &str, tag: &str, limit: usize) -> anyhow::Result<Vec<(String, f32)>> {
    let page = read::by_tag_page(session, keyspace, tag, limit, None).await?;
    Ok(page.items.into_iter().map(|i| (i.media_id, i.score)).collect())
}
