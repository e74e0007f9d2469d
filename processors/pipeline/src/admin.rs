//! `topology apply`, Kafka and registry half: create or update topics, register schemas.
//! Idempotent: running it twice changes nothing the second time.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::client::client_config;
use crate::codec::Codec;
use crate::topology::{TopicSpec, Topology};

/// What `apply` did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Created from nothing.
    Created(String),
    /// Existed; brought in line with the topology.
    Updated(String),
    /// Existed and already matched.
    Unchanged(String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created(s) => write!(f, "created   {s}"),
            Change::Updated(s) => write!(f, "updated   {s}"),
            Change::Unchanged(s) => write!(f, "unchanged {s}"),
        }
    }
}

fn topic_configs(t: &TopicSpec) -> BTreeMap<String, String> {
    let mut c = t.config.clone();
    if let Some(r) = t.retention {
        c.insert("retention.ms".into(), r.as_millis().to_string());
    }
    c
}

/// Create missing topics; for existing ones, raise the partition count and set configs.
pub async fn apply_topics(brokers: &str, topology: &Topology) -> anyhow::Result<Vec<Change>> {
    let extra = &topology.file.kafka.client;
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, extra).create()?;
    let probe: BaseConsumer = client_config(brokers, extra).create()?;
    let metadata = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("Kafka at {brokers} did not answer ({e}); start it with `scripts/stack up` or set KAFKA_BOOTSTRAP"))?;
    let existing: BTreeMap<String, usize> = metadata.topics().iter().map(|t| (t.name().to_string(), t.partitions().len())).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut changes = Vec::new();

    for t in &topology.file.topics {
        let configs = topic_configs(t);
        match existing.get(&t.name) {
            None => {
                let cfg: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let mut nt = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication_factor));
                for (k, v) in &cfg {
                    nt = nt.set(k, v);
                }
                for r in admin.create_topics([&nt], &opts).await? {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
                    }
                }
                changes.push(Change::Created(format!("topic {} ({} partitions)", t.name, t.partitions)));
            }
            Some(&have) => {
                let mut updated = Vec::new();
                if (have as i32) < t.partitions {
                    let np = NewPartitions::new(&t.name, t.partitions as usize);
                    for r in admin.create_partitions([&np], &opts).await? {
                        if let Err((name, code)) = r {
                            anyhow::bail!("adding partitions to {name}: {code}");
                        }
                    }
                    updated.push(format!("partitions {have} -> {}", t.partitions));
                } else if (have as i32) > t.partitions {
                    tracing::warn!(topic = %t.name, have, want = t.partitions, "Kafka cannot remove partitions; leaving the topic as it is");
                }
                if !configs.is_empty() {
                    let spec = ResourceSpecifier::Topic(&t.name);
                    let current = admin.describe_configs([&spec], &opts).await?;
                    let differs = match current.first() {
                        Some(Ok(res)) => configs.iter().any(|(k, v)| res.get(k).and_then(|e| e.value.as_deref()) != Some(v.as_str())),
                        _ => true,
                    };
                    if differs {
                        let mut ac = AlterConfig::new(spec);
                        for (k, v) in &configs {
                            ac = ac.set(k, v);
                        }
                        for r in admin.alter_configs([&ac], &opts).await? {
                            if let Err((_, code)) = r {
                                anyhow::bail!("setting config of topic {}: {code}", t.name);
                            }
                        }
                        updated.push("config".into());
                    }
                }
                changes.push(if updated.is_empty() {
                    Change::Unchanged(format!("topic {}", t.name))
                } else {
                    Change::Updated(format!("topic {} ({})", t.name, updated.join(", ")))
                });
            }
        }
    }
    Ok(changes)
}

/// Register each schema under its subject with its compatibility level.
pub async fn apply_schemas(codec: &Codec, topology: &Topology) -> anyhow::Result<Vec<Change>> {
    let mut changes = Vec::new();
    for s in &topology.file.schemas {
        let path = topology.resolve(&s.file);
        let avsc = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("schemas: cannot read {}: {e}", path.display()))?;
        apache_avro::Schema::parse_str(&avsc).map_err(|e| anyhow::anyhow!("schemas: {} is not valid Avro: {e}", path.display()))?;
        let id = codec.register(&s.subject, &avsc, &s.compatibility).await?;
        changes.push(Change::Unchanged(format!("subject {} -> schema id {id} ({})", s.subject, s.compatibility)));
    }
    Ok(changes)
}
