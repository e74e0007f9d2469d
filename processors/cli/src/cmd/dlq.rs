//! `streamoasis dlq replay`: re-send dead letters to the topic they came from, filtered by error
//! kind and time (or only count them with `--dry-run`).

use streamoasis_pipeline::ops;

use super::{load, parse_time};
use crate::cli::{Common, DlqReplayArgs};

pub(super) async fn replay(c: &Common, a: DlqReplayArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let o = ops::ReplayOptions {
        dlq: a.topic.clone().unwrap_or_else(|| topo.file.processors.tagger.dlq.clone()),
        kinds: a.kind.clone(),
        since: a.since.as_deref().map(|s| parse_time("--since", s)).transpose()?,
        until: a.until.as_deref().map(|s| parse_time("--until", s)).transpose()?,
        dry_run: a.dry_run,
        rate: a.rate,
        progress: !a.quiet,
    };
    let s = ops::dlq_replay(&c.kafka, &topo.file.kafka.client, &o).await?;
    let verb = if a.dry_run { "would re-send" } else { "re-sent" };
    let n = if a.dry_run { s.read - s.skipped } else { s.sent };
    eprintln!("dlq replay: read {}, {verb} {n}, skipped {} (from {})", s.read, s.skipped, o.dlq);
    anyhow::ensure!(
        s.unavailable == 0,
        "{} dead letter(s) carry no value (too large for {}) and their originals are no longer retained in the source topic: they were not re-sent (see the warnings above for their topic/partition/offset)",
        s.unavailable,
        o.dlq
    );
    Ok(())
}
