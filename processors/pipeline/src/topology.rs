//! `topology.yaml`: topics, schemas and processors, loaded into typed config.
//!
//! Parsing rejects unknown keys; [`TopologyFile::validate`] (pure, no I/O) does the cross-field
//! checks and names every key involved, so a typo fails at start-up with an actionable message.
//! The sections that belong to other crates (`tagging` to the tagger, `scylla` to the sink) are
//! kept as raw YAML here and validated by their owners with [`Topology::section`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize};

/// A configuration error: which key, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file (and key, where known) at fault.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

/// One Kafka topic the topology owns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count: the most replicas of a processor that can share the work.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor (1 for a local single broker, 3 in production).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// How long the broker keeps records (`retention.ms`), e.g. `7d`.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Any other topic-level config (`cleanup.policy`, `max.message.bytes`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    1
}

/// A schema registered under a subject.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// Subject name; TopicNameStrategy: `<topic>-value`.
    pub subject: String,
    /// `.avsc` file, relative to topology.yaml.
    pub file: PathBuf,
    /// Compatibility level set on the subject.
    #[serde(default = "default_compat")]
    pub compatibility: String,
}

fn default_compat() -> String {
    "BACKWARD".into()
}

/// Kafka client settings shared by every processor.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSpec {
    /// Extra librdkafka properties applied to every client (e.g. `security.protocol`). Secrets go
    /// in the environment or files, not here (see [`crate::client`]).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSpec").field("client", &crate::secret::redacted(&self.client)).finish()
    }
}

/// How a processor consumes and produces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSpec {
    /// Input topic.
    pub input: String,
    /// Output topic, if the processor produces records.
    #[serde(default)]
    pub output: Option<String>,
    /// Dead-letter topic for poison input.
    pub dlq: String,
    /// Consumer group id (replicas of one processor share it).
    pub group: String,
    /// Records read but not yet fully handled, per replica. Above it partitions are paused;
    /// they resume at half. Higher keeps the model busier across stalls; lower bounds memory.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// On SIGTERM: how long to finish in-flight records before committing and exiting.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// librdkafka prefetch cap per partition (`queued.max.messages.kbytes` / partitions).
    #[serde(default = "default_prefetch")]
    pub max_prefetch_kbytes: u32,
    /// Larger input records are dead-lettered (`record_too_large`) before any decoding.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// How long one record may keep failing transiently (database down, registry 5xx) before
    /// the error escalates to fatal: liveness fails and the process exits non-zero, so the
    /// orchestrator restarts it and alerts fire. Longer rides out longer outages silently.
    #[serde(default = "default_transient_budget", with = "humantime_serde")]
    pub transient_budget: Duration,
    /// Liveness fails when records are in flight and none completed for this long.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Liveness fails when the consumer reports only errors (authentication, authorisation,
    /// broker unreachable) for this long.
    #[serde(default = "default_consumer_error_timeout", with = "humantime_serde")]
    pub consumer_error_timeout: Duration,
    /// `at_least_once` (default) or `exactly_once` (Kafka transactions; subscribers read with
    /// `isolation.level=read_committed`). Only processors with an output topic support it.
    #[serde(default)]
    pub delivery: Delivery,
    /// Exactly-once: the longest a transaction stays open (records per commit grow with load).
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
}

/// Delivery guarantee of a processor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Offsets stored after outputs are acknowledged; replays possible after a crash.
    #[default]
    AtLeastOnce,
    /// Consume-transform-produce in Kafka transactions.
    ExactlyOnce,
}

fn default_max_record_bytes() -> usize {
    crate::error::limits::DEFAULT_MAX_RECORD_BYTES
}
fn default_transient_budget() -> Duration {
    Duration::from_secs(600)
}
pub(crate) fn default_stall_timeout() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn default_consumer_error_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(500)
}

/// librdkafka properties the run loop owns: setting them in `kafka.client` would break the
/// delivery guarantee, so they are refused at start-up.
pub const RESERVED_CLIENT_KEYS: [&str; 12] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
    "enable.idempotence",
    "acks",
    "transactional.id",
    "partition.assignment.strategy",
    "enable.partition.eof",
    "max.in.flight.requests.per.connection",
];

fn default_in_flight() -> usize {
    512
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_prefetch() -> u32 {
    4096
}

/// The processors the binary runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorsSpec {
    /// `streamoasis tagger`.
    pub tagger: ProcessorSpec,
    /// `streamoasis sink`.
    pub sink: ProcessorSpec,
}

/// The whole file, as parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    /// Topics to create or update.
    pub topics: Vec<TopicSpec>,
    /// Schemas to register.
    pub schemas: Vec<SchemaSpec>,
    /// Kafka client settings.
    #[serde(default)]
    pub kafka: KafkaSpec,
    /// Processors.
    pub processors: ProcessorsSpec,
    /// Tagging section, validated by `streamoasis-tagger`.
    #[serde(default)]
    pub tagging: serde_yaml::Value,
    /// ScyllaDB section, validated by `streamoasis-sink`.
    #[serde(default)]
    pub scylla: serde_yaml::Value,
}

/// A loaded and validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The parsed file.
    pub file: TopologyFile,
    /// Where it was loaded from (relative paths in it are resolved against its folder).
    pub path: PathBuf,
}

impl TopologyFile {
    /// Cross-field checks; pure. Each message names the keys involved.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError::new(format!("{origin}: {key}"), msg));
        let mut names = HashSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            if t.name.trim().is_empty() {
                return err(&format!("topics[{i}].name"), "must not be empty".into());
            }
            if !names.insert(t.name.as_str()) {
                return err(&format!("topics[{i}].name"), format!("topic '{}' is declared twice", t.name));
            }
            if t.partitions < 1 {
                return err(&format!("topics[{i}].partitions"), format!("must be >= 1, got {}", t.partitions));
            }
            if t.replication_factor < 1 {
                return err(&format!("topics[{i}].replication_factor"), format!("must be >= 1, got {}", t.replication_factor));
            }
        }
        let declared = || {
            let mut v: Vec<_> = names.iter().copied().collect();
            v.sort();
            v.join(", ")
        };
        for (pname, p) in [("tagger", &self.processors.tagger), ("sink", &self.processors.sink)] {
            let key = |k: &str| format!("processors.{pname}.{k}");
            for (k, topic) in [("input", Some(&p.input)), ("output", p.output.as_ref()), ("dlq", Some(&p.dlq))] {
                if let Some(topic) = topic {
                    if !names.contains(topic.as_str()) {
                        return err(&key(k), format!("topic '{topic}' is not declared under topics (declared: {})", declared()));
                    }
                }
            }
            if p.output.as_deref() == Some(p.input.as_str()) {
                return err(&key("output"), format!("must differ from processors.{pname}.input ('{}'), or the processor would read its own output", p.input));
            }
            if p.dlq == p.input || p.output.as_deref() == Some(p.dlq.as_str()) {
                return err(&key("dlq"), format!("'{}' must differ from processors.{pname}.input and .output", p.dlq));
            }
            if p.group.trim().is_empty() {
                return err(&key("group"), "must not be empty".into());
            }
            if p.max_in_flight == 0 {
                return err(&key("max_in_flight"), "must be >= 1".into());
            }
        }
        for k in self.kafka.client.keys() {
            if RESERVED_CLIENT_KEYS.contains(&k.as_str()) {
                return err(&format!("kafka.client.{k}"), format!("'{k}' is set by streamoasis itself (delivery guarantees depend on it): remove it"));
            }
        }
        if self.processors.sink.delivery == Delivery::ExactlyOnce {
            return err("processors.sink.delivery", "exactly_once needs an output topic; the sink writes idempotent upserts, use at_least_once".into());
        }
        for (pname, p) in [("tagger", &self.processors.tagger), ("sink", &self.processors.sink)] {
            if p.max_record_bytes < 1024 {
                return err(&format!("processors.{pname}.max_record_bytes"), format!("must be >= 1024, got {}", p.max_record_bytes));
            }
            if p.commit_interval.is_zero() {
                return err(&format!("processors.{pname}.commit_interval"), "must be > 0".into());
            }
        }
        if self.processors.tagger.output.is_none() {
            return err("processors.tagger.output", "the tagger needs an output topic (e.g. media.tagged)".into());
        }
        if self.processors.tagger.group == self.processors.sink.group {
            return err("processors.sink.group", format!("must differ from processors.tagger.group ('{}')", self.processors.tagger.group));
        }
        for (i, s) in self.schemas.iter().enumerate() {
            const LEVELS: [&str; 7] = ["BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE"];
            if !LEVELS.contains(&s.compatibility.as_str()) {
                return err(&format!("schemas[{i}].compatibility"), format!("'{}' is not one of {}", s.compatibility, LEVELS.join(", ")));
            }
        }
        for (pname, topic) in [("tagger.input", &self.processors.tagger.input), ("sink.input", &self.processors.sink.input)] {
            let subject = format!("{topic}-value");
            if !self.schemas.iter().any(|s| s.subject == subject) {
                return err("schemas", format!("no schema for subject '{subject}' (the value subject of processors.{pname})"));
            }
        }
        Ok(())
    }
}

impl Topology {
    /// Read, parse and validate a topology file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&origin, format!("cannot read: {e} (pass --topology <file>, or run from the project root)")))?;
        Self::parse(&text, path)
    }

    /// Parse and validate topology text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let file: TopologyFile = serde_yaml::from_str(text).map_err(|e| ConfigError::new(&origin, e.to_string()))?;
        file.validate(&origin)?;
        Ok(Topology { file, path: path.to_path_buf() })
    }

    /// Resolve a path written in the file relative to the file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Deserialize a section owned by another crate, with unknown keys rejected by its type.
    pub fn section<T: DeserializeOwned>(&self, name: &str, value: &serde_yaml::Value) -> Result<T, ConfigError> {
        let value = if value.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { value.clone() };
        serde_yaml::from_value(value).map_err(|e| ConfigError::new(format!("{}: {name}", self.path.display()), e.to_string()))
    }

    /// The spec of a declared topic.
    pub fn topic(&self, name: &str) -> Option<&TopicSpec> {
        self.file.topics.iter().find(|t| t.name == name)
    }

    /// Make this a copy of the pipeline that shares nothing with the original on the same
    /// cluster (tests, benchmarks, a canary): every topic gets `-<id>` (and so do the subjects,
    /// inputs, outputs and DLQs naming it), every consumer group `-<id>`, the keyspace `_<id>`.
    /// `id` may hold ASCII letters, digits and `_` (valid in all three).
    pub fn isolate(&mut self, id: &str) -> Result<(), ConfigError> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::new("isolate", format!("'{id}': use ASCII letters, digits and '_' only")));
        }
        let renamed = |name: &str| format!("{name}-{id}");
        let f = &mut self.file;
        for t in &mut f.topics {
            t.name = renamed(&t.name);
        }
        for s in &mut f.schemas {
            if let Some(topic) = s.subject.strip_suffix("-value") {
                s.subject = format!("{}-value", renamed(topic));
            }
        }
        for spec in [&mut f.processors.tagger, &mut f.processors.sink] {
            spec.input = renamed(&spec.input);
            spec.output = spec.output.as_deref().map(renamed);
            spec.dlq = renamed(&spec.dlq);
            spec.group = renamed(&spec.group);
        }
        if f.scylla.is_null() {
            f.scylla = serde_yaml::Value::Mapping(Default::default());
        }
        if let serde_yaml::Value::Mapping(m) = &mut f.scylla {
            let ks = m.get("keyspace").and_then(serde_yaml::Value::as_str).unwrap_or("streamoasis").to_string();
            m.insert("keyspace".into(), format!("{ks}_{id}").into());
        }
        let origin = self.path.display().to_string();
        self.file.validate(&origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_renames_every_shared_name() {
        let mut t = Topology::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.yaml")).unwrap();
        let before = t.file.clone();
        t.isolate("t1").unwrap();
        let f = &t.file;
        assert!(f.topics.iter().zip(&before.topics).all(|(a, b)| a.name == format!("{}-t1", b.name)));
        assert!(f.schemas.iter().all(|s| s.subject.ends_with("-t1-value") && t.topic(s.subject.trim_end_matches("-value")).is_some()));
        for (a, b) in [(&f.processors.tagger, &before.processors.tagger), (&f.processors.sink, &before.processors.sink)] {
            assert_eq!((a.input.clone(), a.dlq.clone(), a.group.clone()), (format!("{}-t1", b.input), format!("{}-t1", b.dlq), format!("{}-t1", b.group)));
            assert!(t.topic(&a.input).is_some() && t.topic(&a.dlq).is_some());
        }
        assert_eq!(f.processors.tagger.output.as_deref(), Some(f.processors.sink.input.as_str()));
        assert!(f.scylla["keyspace"].as_str().unwrap().ends_with("_t1"));
        assert!(t.isolate("bad-id").unwrap_err().to_string().contains("bad-id"));
    }

    const BASE: &str = r#"
topics:
  - {name: media.ingested, partitions: 3}
  - {name: media.tagged}
  - {name: media.ingested.dlq}
  - {name: media.tagged.dlq}
schemas:
  - {subject: media.ingested-value, file: schemas/media_ingested.avsc}
  - {subject: media.tagged-value, file: schemas/media_tagged.avsc}
processors:
  tagger: {input: media.ingested, output: media.tagged, dlq: media.ingested.dlq, group: g-tagger, drain_timeout: 5s}
  sink: {input: media.tagged, dlq: media.tagged.dlq, group: g-sink}
"#;

    fn parse(text: &str) -> Result<Topology, ConfigError> {
        Topology::parse(text, Path::new("topology.yaml"))
    }

    #[test]
    fn valid_topology_loads_with_defaults() {
        let t = parse(BASE).unwrap();
        assert_eq!(t.topic("media.ingested").unwrap().partitions, 3);
        assert_eq!(t.topic("media.tagged").unwrap().partitions, 6);
        assert_eq!(t.file.processors.tagger.drain_timeout, Duration::from_secs(5));
        assert_eq!(t.file.processors.sink.max_in_flight, 512);
        assert_eq!(t.file.schemas[0].compatibility, "BACKWARD");
    }

    #[test]
    fn the_project_topology_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../topology.yaml");
        Topology::load(&path).unwrap();
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = BASE.replace("group: g-sink}", "group: g-sink, max_inflight: 3}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("max_inflight"), "{e}");
    }

    #[test]
    fn undeclared_topic_names_the_key() {
        let text = BASE.replace("output: media.tagged,", "output: media.taged,");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("processors.tagger.output") && e.contains("media.taged"), "{e}");
    }

    #[test]
    fn output_equal_to_input_names_both_keys() {
        let text = BASE.replace("output: media.tagged,", "output: media.ingested,");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("processors.tagger.output") && e.contains("processors.tagger.input"), "{e}");
    }

    #[test]
    fn bad_duration_and_compat_are_reported() {
        let e = parse(&BASE.replace("drain_timeout: 5s", "drain_timeout: soon")).unwrap_err().to_string();
        assert!(e.contains("drain_timeout"), "{e}");
        let e = parse(&BASE.replace("file: schemas/media_tagged.avsc}", "file: schemas/media_tagged.avsc, compatibility: SIDEWAYS}")).unwrap_err().to_string();
        assert!(e.contains("schemas[1].compatibility"), "{e}");
    }

    #[test]
    fn reserved_client_keys_are_refused_by_name() {
        let text = format!("{BASE}kafka:\n  client:\n    enable.auto.offset.store: \"true\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("kafka.client.enable.auto.offset.store"), "{e}");
        let ok = format!("{BASE}kafka:\n  client:\n    security.protocol: SASL_SSL\n");
        parse(&ok).unwrap();
    }

    #[test]
    fn delivery_defaults_to_at_least_once_and_sink_cannot_be_exactly_once() {
        let t = parse(BASE).unwrap();
        assert_eq!(t.file.processors.tagger.delivery, Delivery::AtLeastOnce);
        let t = parse(&BASE.replace("drain_timeout: 5s}", "drain_timeout: 5s, delivery: exactly_once}")).unwrap();
        assert_eq!(t.file.processors.tagger.delivery, Delivery::ExactlyOnce);
        let e = parse(&BASE.replace("group: g-sink}", "group: g-sink, delivery: exactly_once}")).unwrap_err().to_string();
        assert!(e.contains("processors.sink.delivery"), "{e}");
    }

    #[test]
    fn shared_group_is_rejected() {
        let e = parse(&BASE.replace("group: g-sink", "group: g-tagger")).unwrap_err().to_string();
        assert!(e.contains("processors.sink.group"), "{e}");
    }
}
