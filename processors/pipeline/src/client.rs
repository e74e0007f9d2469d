//! Kafka clients: the librdkafka properties every client of ours gets, and the security settings
//! that come from the environment.
//!
//! Properties = the topology's `kafka.client` map, overlaid with the environment
//! ([`properties`]): `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_MECHANISM`, `KAFKA_SASL_USERNAME`,
//! `KAFKA_SASL_PASSWORD` (or `KAFKA_SASL_PASSWORD_FILE`, e.g. a mounted Kubernetes Secret),
//! `KAFKA_SSL_CA_LOCATION`, and for client certificates `KAFKA_SSL_CERTIFICATE_LOCATION`,
//! `KAFKA_SSL_KEY_LOCATION`, `KAFKA_SSL_KEY_PASSWORD` (or `_FILE`). Secrets belong in the
//! environment or in files, not in topology.yaml (a ConfigMap in Kubernetes).
//!
//! Every client built here ([`client_config`], [`producer`], [`wait_for_broker`], the run loop,
//! `topology apply`) uses the same properties, so a client that can reach a secured cluster at all
//! reaches it the same way everywhere. `Debug` output and logs show them through
//! [`crate::secret::redacted`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;

use crate::secret::{self, redacted};
use crate::topology::{ConfigError, ProcessorSpec};

/// Environment variables read by [`security_from_env`], with the librdkafka property each sets.
pub mod env {
    /// `security.protocol`: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    pub const SECURITY_PROTOCOL: &str = "KAFKA_SECURITY_PROTOCOL";
    /// `sasl.mechanism`: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...
    pub const SASL_MECHANISM: &str = "KAFKA_SASL_MECHANISM";
    /// `sasl.username`.
    pub const SASL_USERNAME: &str = "KAFKA_SASL_USERNAME";
    /// `sasl.password` (or `KAFKA_SASL_PASSWORD_FILE`).
    pub const SASL_PASSWORD: &str = "KAFKA_SASL_PASSWORD";
    /// `ssl.ca.location`: PEM file of the CA(s) that signed the brokers' certificates.
    pub const SSL_CA_LOCATION: &str = "KAFKA_SSL_CA_LOCATION";
    /// `ssl.certificate.location`: client certificate (PEM), for brokers that require one.
    pub const SSL_CERTIFICATE_LOCATION: &str = "KAFKA_SSL_CERTIFICATE_LOCATION";
    /// `ssl.key.location`: the client certificate's private key (PEM).
    pub const SSL_KEY_LOCATION: &str = "KAFKA_SSL_KEY_LOCATION";
    /// `ssl.key.password` (or `KAFKA_SSL_KEY_PASSWORD_FILE`), when the key is encrypted.
    pub const SSL_KEY_PASSWORD: &str = "KAFKA_SSL_KEY_PASSWORD";
}

const PROTOCOLS: [&str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

/// The security properties the environment sets (only those that are set).
pub fn security_from_env() -> Result<BTreeMap<String, String>, ConfigError> {
    let mut m = BTreeMap::new();
    if let Some(p) = secret::var(env::SECURITY_PROTOCOL) {
        let p = p.trim().to_ascii_uppercase();
        if !PROTOCOLS.contains(&p.as_str()) {
            return Err(ConfigError::new(env::SECURITY_PROTOCOL, format!("'{p}' is not one of {}", PROTOCOLS.join(", "))));
        }
        m.insert("security.protocol".into(), p);
    }
    for (var, key) in [
        (env::SASL_MECHANISM, "sasl.mechanism"),
        (env::SASL_USERNAME, "sasl.username"),
        (env::SSL_CA_LOCATION, "ssl.ca.location"),
        (env::SSL_CERTIFICATE_LOCATION, "ssl.certificate.location"),
        (env::SSL_KEY_LOCATION, "ssl.key.location"),
    ] {
        if let Some(v) = secret::var(var) {
            m.insert(key.into(), v.trim().to_string());
        }
    }
    for (var, key) in [(env::SASL_PASSWORD, "sasl.password"), (env::SSL_KEY_PASSWORD, "ssl.key.password")] {
        if let Some(s) = secret::from_env(var)? {
            m.insert(key.into(), s.expose().to_string());
        }
    }
    Ok(m)
}

/// The topology's `kafka.client` overlaid with the environment's security settings, checked.
pub fn properties(topology_client: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut m = topology_client.clone();
    // librdkafka takes both spellings; keep one so the overlay really overrides.
    if let Some(v) = m.remove("sasl.mechanisms") {
        m.entry("sasl.mechanism".into()).or_insert(v);
    }
    m.extend(security_from_env()?);
    check(&m)?;
    Ok(m)
}

/// Cross-checks of a property map: SASL needs a user and password; named files exist.
pub fn check(m: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let protocol = m.get("security.protocol").map(|p| p.to_ascii_uppercase()).unwrap_or_else(|| "PLAINTEXT".into());
    if protocol.starts_with("SASL_") {
        let mechanism = m.get("sasl.mechanism").map(|s| s.to_ascii_uppercase()).unwrap_or_else(|| "GSSAPI".into());
        if mechanism == "PLAIN" || mechanism.starts_with("SCRAM-") {
            if !m.contains_key("sasl.username") {
                return Err(ConfigError::new(
                    env::SASL_USERNAME,
                    format!("security.protocol {protocol} with {mechanism} needs a user: set {} (or kafka.client sasl.username)", env::SASL_USERNAME),
                ));
            }
            if !m.contains_key("sasl.password") {
                return Err(ConfigError::new(
                    env::SASL_PASSWORD,
                    format!("security.protocol {protocol} with {mechanism} needs a password: set {0} or {0}_FILE", env::SASL_PASSWORD),
                ));
            }
        }
    }
    for (key, var) in [("ssl.ca.location", env::SSL_CA_LOCATION), ("ssl.certificate.location", env::SSL_CERTIFICATE_LOCATION), ("ssl.key.location", env::SSL_KEY_LOCATION)] {
        if let Some(p) = m.get(key) {
            if p != "probe" && !Path::new(p).is_file() {
                return Err(ConfigError::new(var, format!("{key} '{p}' is not a readable file (set {var} or kafka.client {key} to a PEM file)")));
            }
        }
    }
    Ok(())
}

/// Base librdkafka config for any client of ours.
pub fn client_config(brokers: &str, extra: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("client.id", "streamoasis");
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// librdkafka's default `message.max.bytes`: the largest record a producer sends unless
/// `kafka.client` raises it.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Largest fetch response a processor's consumer asks for (raised to `message.max.bytes` when
/// that is larger, so one record always fits).
pub const DEFAULT_FETCH_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// A processor's consumer. Tunables first (`kafka.client` may override them), then the
/// properties the delivery guarantee depends on, which always win: auto-store off (the run loop
/// stores watermarks), auto-commit on for at-least-once and off for exactly-once (offsets go
/// through transactions), cooperative rebalancing, `read_committed`.
pub fn consumer_config(brokers: &str, extra: &BTreeMap<String, String>, spec: &ProcessorSpec, exactly_once: bool) -> ClientConfig {
    let user_max = extra.get("message.max.bytes").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut c = ClientConfig::new();
    c.set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .set("max.poll.interval.ms", "300000")
        .set("queued.max.messages.kbytes", spec.max_prefetch_kbytes.to_string())
        .set("fetch.max.bytes", DEFAULT_FETCH_MAX_BYTES.max(user_max).to_string())
        .set("statistics.interval.ms", "5000");
    // The raw properties, not `ClientConfig::config_map` (which masks passwords).
    c.set("bootstrap.servers", brokers).set("client.id", "streamoasis");
    for (k, v) in extra {
        c.set(k, v);
    }
    c.set("group.id", &spec.group)
        .set("enable.auto.commit", if exactly_once { "false" } else { "true" })
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("isolation.level", "read_committed");
    c
}

/// A transactional producer for exactly-once delivery. Zombies are fenced by the consumer group
/// metadata sent with the offsets (KIP-447); the transactional id is stable per instance
/// (`STREAMOASIS_TRANSACTIONAL_ID`, else `<group>-<hostname>`: the pod name in Kubernetes), so a
/// restarted instance aborts the transaction its predecessor left open at once instead of
/// leaving `read_committed` readers waiting for `transaction.timeout.ms`. Replicas must not
/// share an id: on one host, give each its own `STREAMOASIS_TRANSACTIONAL_ID`.
pub fn transactional_producer(brokers: &str, extra: &BTreeMap<String, String>, group: &str) -> Result<FutureProducer, KafkaError> {
    let id = std::env::var("STREAMOASIS_TRANSACTIONAL_ID").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "local".into());
        format!("{group}-{host}")
    });
    let mut c = producer_config(brokers, extra);
    c.set("transactional.id", id).set("transaction.timeout.ms", "30000");
    c.create()
}

/// How long the producer tries to deliver a record before failing it (`message.timeout.ms`).
pub const PRODUCE_TIMEOUT_MS: &str = "30000";

/// How long the producer waits to fill a request (`linger.ms`). A batch's outputs are sent
/// within microseconds of each other, so 1 ms still puts them in one request, while librdkafka's
/// own default (5 ms) added 5 ms to every record at low load (the produce step of the latency
/// sweep). `kafka.client` may set another value.
pub const DEFAULT_LINGER_MS: &str = "1";

/// A producer's properties: tunables first (`kafka.client` may override them), then the ones
/// the delivery guarantee depends on, which always win (idempotence, `acks=all`).
pub fn producer_config(brokers: &str, extra: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("linger.ms", DEFAULT_LINGER_MS)
        .set("compression.type", "lz4")
        // A record the broker has not acknowledged in 30 s fails and is retried by the run loop
        // (with backoff, within the transient budget) instead of holding its key and the
        // partition watermark for minutes across a broker restart.
        .set("message.timeout.ms", PRODUCE_TIMEOUT_MS)
        .set("bootstrap.servers", brokers)
        .set("client.id", "streamoasis");
    for (k, v) in extra {
        c.set(k, v);
    }
    c.set("enable.idempotence", "true").set("acks", "all");
    c
}

/// An idempotent producer with `acks=all`, for outputs and dead letters.
pub fn producer(brokers: &str, extra: &BTreeMap<String, String>) -> Result<FutureProducer, KafkaError> {
    producer_config(brokers, extra).create()
}

/// Remembers the client's last error (authentication, TLS, ...) so a failed wait can say why.
#[derive(Default)]
struct LastError(Mutex<Option<String>>);

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "kafka client error");
        *self.0.lock().unwrap() = Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for LastError {}

/// Wait until the broker answers a metadata request with the same properties the processors
/// use (security included), or fail with a message saying what to do.
pub fn wait_for_broker(brokers: &str, extra: &BTreeMap<String, String>, timeout: Duration) -> anyhow::Result<()> {
    tracing::debug!(brokers, properties = ?redacted(extra), "waiting for Kafka");
    let c: BaseConsumer<LastError> = client_config(brokers, extra).create_with_context(LastError::default())?;
    match c.fetch_metadata(None, timeout) {
        Ok(_) => Ok(()),
        Err(e) => {
            // Errors such as a failed authentication reach us when the client is polled; the
            // most telling one (authentication, TLS) wins over "all brokers down".
            let mut errors: Vec<String> = c.context().0.lock().unwrap().take().into_iter().collect();
            for _ in 0..10 {
                match c.poll(Duration::from_millis(100)) {
                    Some(Err(polled)) => errors.push(polled.to_string()),
                    Some(Ok(_)) => {}
                    None => break,
                }
            }
            let telling = |e: &&String| ["authenticat", "ssl", "certificate", "handshake"].iter().any(|k| e.to_lowercase().contains(k));
            let last = errors.iter().find(telling).or(errors.first()).cloned();
            let protocol = extra.get("security.protocol").map(String::as_str).unwrap_or("PLAINTEXT");
            let why = last.map(|l| format!("; last client error: {l}")).unwrap_or_default();
            Err(anyhow::anyhow!(
                "Kafka at {brokers} did not answer over {protocol} ({e}{why}); start it with `scripts/stack up`, set KAFKA_BOOTSTRAP, and check KAFKA_SECURITY_PROTOCOL / KAFKA_SASL_* / KAFKA_SSL_CA_LOCATION"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn sasl_without_password_names_the_variable() {
        let e = check(&map(&[("security.protocol", "SASL_SSL"), ("sasl.mechanism", "SCRAM-SHA-512"), ("sasl.username", "u")])).unwrap_err().to_string();
        assert!(e.contains("KAFKA_SASL_PASSWORD"), "{e}");
        let e = check(&map(&[("security.protocol", "SASL_SSL"), ("sasl.mechanism", "SCRAM-SHA-512")])).unwrap_err().to_string();
        assert!(e.contains("KAFKA_SASL_USERNAME"), "{e}");
        check(&map(&[("security.protocol", "SASL_SSL"), ("sasl.mechanism", "SCRAM-SHA-512"), ("sasl.username", "u"), ("sasl.password", "p")])).unwrap();
    }

    #[test]
    fn a_missing_ca_file_names_the_variable() {
        let e = check(&map(&[("ssl.ca.location", "/nonexistent/ca.pem")])).unwrap_err().to_string();
        assert!(e.contains("KAFKA_SSL_CA_LOCATION") && e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_guarantee_s_properties_win_over_kafka_client() {
        let spec: ProcessorSpec = serde_yaml::from_str("{input: a, dlq: b, group: g, max_prefetch_kbytes: 2048}").unwrap();
        let user = map(&[
            ("enable.auto.offset.store", "true"),
            ("group.id", "other"),
            ("isolation.level", "read_uncommitted"),
            ("message.max.bytes", "20000000"),
            ("session.timeout.ms", "45000"),
        ]);
        let c = consumer_config("b:9092", &user, &spec, false);
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        assert_eq!(c.get("enable.auto.commit"), Some("true"));
        assert_eq!(c.get("session.timeout.ms"), Some("45000"), "a tunable the user may set");
        assert_eq!(c.get("fetch.max.bytes"), Some("20000000"), "raised to fit the largest record");
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("2048"));
        assert_eq!(consumer_config("b:9092", &user, &spec, true).get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn producer_tunables_yield_to_kafka_client_and_the_guarantee_does_not() {
        let c = producer_config("b:9092", &BTreeMap::new());
        assert_eq!(c.get("linger.ms"), Some(DEFAULT_LINGER_MS));
        assert_eq!(c.get("message.timeout.ms"), Some(PRODUCE_TIMEOUT_MS));
        let user = map(&[("linger.ms", "20"), ("compression.type", "zstd"), ("acks", "1"), ("enable.idempotence", "false")]);
        let c = producer_config("b:9092", &user);
        assert_eq!(c.get("linger.ms"), Some("20"), "a tunable the user may set");
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn runner_config_debug_hides_the_password() {
        let spec: crate::topology::ProcessorSpec = serde_yaml::from_str("{input: a, dlq: b, group: g}").unwrap();
        let cfg = crate::kafka::RunnerConfig::new("b:9092", spec, map(&[("sasl.password", "hunter2"), ("sasl.username", "tagger")]));
        let s = format!("{cfg:?}");
        assert!(!s.contains("hunter2") && s.contains("tagger"), "{s}");
    }
}
