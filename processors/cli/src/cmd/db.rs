//! `streamoasis db`: what the sink stored: row counts (`stats`, also per model and taxonomy
//! version, marking stale rows), one item's tags (`get`) and the
//! items carrying a tag, best first (`by-tag`), read through [`streamoasis_sink::read`].

use std::sync::Arc;

use streamoasis_sink::read::{count_by_tag, count_by_version, Reader};
use streamoasis_sink::{count_rows, SinkConfig};
use streamoasis_tagger::model::read_manifest;
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
            let tc = TaggerConfig::from_topology(&topo).ok();
            // The model and taxonomy this topology tags with: rows of others are stale.
            let current_model = tc.as_ref().and_then(|t| read_manifest(&t.model.path).ok()).map(|m| format!("{}@{}", m.name, m.version));
            let current_taxonomy = tc.as_ref().map(|t| t.taxonomy_version(&t.labels));
            for ((model, taxonomy), n) in count_by_version(&session, ks).await? {
                let current = model.is_some() && model == current_model && taxonomy.is_some() && taxonomy == current_taxonomy;
                println!(
                    "media_tags       model {} taxonomy {}: {n} rows{}",
                    model.as_deref().unwrap_or("-"),
                    taxonomy.as_deref().unwrap_or("- (written before versions were kept)"),
                    if current { " (current)" } else { " (stale: retag to update)" }
                );
            }
            if let Some(tc) = &tc {
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
