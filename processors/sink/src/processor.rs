//! [`SinkProcessor`]: the pipeline processor around the [`TagWriter`], and [`serve`], which runs
//! it on the Kafka run loop as `streamoasis sink` does.
//!
//! Checks that no database could accept (empty or over-long media id, a non-finite score) send
//! the record to the dead-letter topic before any write; the writer's errors map to poison,
//! transient or fatal.

use std::sync::Arc;

use streamoasis_pipeline::error::{limits, ErrorKind};
use streamoasis_pipeline::events::{MediaTagged, NoOutput};
use streamoasis_pipeline::processor::{ProcessError, Processor, RecordMeta};
use streamoasis_pipeline::topology::Topology;

use crate::writer::{TagWriter, WriteError};

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
    // No output topic: the sink returns no events.
    type Output = NoOutput;

    fn name(&self) -> &'static str {
        "sink"
    }

    async fn process(&self, e: MediaTagged, _meta: RecordMeta) -> Result<Vec<NoOutput>, ProcessError> {
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
