//! `streamoasis topology check` (parse and validate the file, no connection) and
//! `streamoasis topology apply` (topics, schemas, keyspace and tables, idempotently).

use anyhow::Context;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::secret::redact_url;
use streamoasis_pipeline::{admin, telemetry};
use streamoasis_sink::SinkConfig;
use streamoasis_tagger::TaggerConfig;

use super::{load, load_for_kafka};
use crate::cli::Common;

pub(super) fn check(c: &Common) -> anyhow::Result<()> {
    let topo = load(c)?;
    TaggerConfig::from_topology(&topo)?;
    SinkConfig::from_topology(&topo)?;
    println!("{}: ok ({} topics, {} schemas)", c.topology.display(), topo.file.topics.len(), topo.file.schemas.len());
    Ok(())
}

pub(super) async fn apply(c: &Common, no_db: bool) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis");
    let topo = load_for_kafka(c)?;
    let sink_cfg = SinkConfig::from_topology(&topo)?;
    TaggerConfig::from_topology(&topo)?;
    for ch in admin::apply_topics(&c.kafka, &topo).await? {
        println!("{ch}");
    }
    let codec = Codec::new(&c.registry)?;
    for ch in admin::apply_schemas(&codec, &topo).await.with_context(|| format!("registering schemas at {}", redact_url(&c.registry)))? {
        println!("{ch}");
    }
    if !no_db {
        let session = streamoasis_sink::connect(&c.scylla, &sink_cfg).await?;
        for ch in streamoasis_sink::schema::apply(&session, &sink_cfg).await.context("creating keyspace and tables")? {
            println!("{ch}");
        }
        println!("ensured   keyspace {} (tables media_tags, media_by_tag)", sink_cfg.keyspace);
    }
    Ok(())
}
