//! `streamoasis retag`: re-send archived ingest records to the ingest topic (after a taxonomy or
//! model change), from a time, partition offsets or the beginning, optionally only some media ids.

use anyhow::Context;
use streamoasis_pipeline::ops;

use super::{load, parse_time};
use crate::cli::{Common, RetagArgs};

pub(super) async fn run(c: &Common, a: RetagArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let start = match (&a.since, &a.offsets, a.from_beginning) {
        (Some(s), _, _) => ops::Start::Timestamp(parse_time("--since", s)?),
        (None, Some(o), _) => ops::Start::Offsets(
            o.iter()
                .map(|po| {
                    let (p, off) = po.split_once(':').ok_or_else(|| anyhow::anyhow!("--offsets '{po}': use partition:offset"))?;
                    Ok((p.trim().parse()?, off.trim().parse()?))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
        (None, None, true) => ops::Start::Beginning,
        (None, None, false) if a.ids.is_some() => ops::Start::Beginning,
        _ => anyhow::bail!("say where to start: --since, --offsets, --from-beginning (or --ids, which reads from the beginning)"),
    };
    let ids = match &a.ids {
        None => None,
        Some(f) if f.starts_with('@') => Some(
            std::fs::read_to_string(&f[1..]).with_context(|| format!("--ids: cannot read {}", &f[1..]))?.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        ),
        Some(l) => Some(l.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
    };
    let o = ops::RetagOptions { topic: topo.file.processors.tagger.input.clone(), start, media_ids: ids, rate: a.rate, progress: !a.quiet };
    let s = ops::retag(&c.kafka, &topo.file.kafka.client, &o).await?;
    eprintln!("retag: read {}, re-sent {}, skipped {} (topic {})", s.read, s.sent, s.skipped, o.topic);
    Ok(())
}
