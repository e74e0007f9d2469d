//! `streamoasis db`: what the sink stored: row counts (`stats`), one item's tags (`get`) and the
//! items carrying a tag, best first (`by-tag`), read through [`streamoasis_sink::read`].

use std::sync::Arc;

use streamoasis_sink::read::{count_by_tag, Reader};
use streamoasis_sink::{count_rows, SinkConfig};
use streamoasis_tagger::TaggerConfig;

use super::load;
use crate::cli::{Common, DbAction};

pub(super) async fn run(c: &Common, action: DbAction) -> anyhow::Result<()> {
    let topo = load(c)?;
    let cfg = SinkConfig::from_topology(&topo)?;
    let session = Arc::new(streamoasis_sink::connect(&c.scylla, &cfg).await?);
    let ks = &cfg.keyspace;
    match action {
        DbAction::Stats => {
            let n = count_rows(&session, &format!("SELECT COUNT(*) FROM {ks}.media_tags")).await?;
            println!("media_tags       {n} rows");
            if let Ok(tc) = TaggerConfig::from_topology(&topo) {
                for l in &tc.labels {
                    println!("media_by_tag     {:<14} {} rows", l.name, count_by_tag(&session, ks, &l.name).await?);
                }
            }
        }
        DbAction::Get { media_id } => match Reader::new(session, ks).await?.media(&media_id).await? {
            Some(m) => println!("{media_id}: {}", m.tags.iter().map(|(l, s)| format!("{l} {s:.3}")).collect::<Vec<_>>().join(", ")),
            None => println!("{media_id}: not found"),
        },
        DbAction::ByTag { tag, limit } => {
            for i in Reader::new(session, ks).await?.by_tag(&tag, limit, None).await?.items {
                println!("{:.3}  {}", i.score, i.media_id);
            }
        }
    }
    Ok(())
}
