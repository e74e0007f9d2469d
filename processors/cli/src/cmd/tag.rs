//! `streamoasis tag`: tag text locally with the configured model (no Kafka, no database): one
//! text, stdin as one text, or stdin one text per line (`--lines`), tagged concurrently so the
//! model batches them.

use std::io::BufRead;

use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

use super::load;
use crate::cli::{Common, TagArgs};

pub(super) async fn run(c: &Common, a: TagArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    let tagger = Tagger::load(cfg).await?;
    let texts: Vec<String> = match (&a.text, a.lines) {
        (Some(t), _) => vec![t.clone()],
        (None, true) => std::io::stdin().lock().lines().collect::<Result<_, _>>()?,
        (None, false) => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            vec![s]
        }
    };
    let tagger = &tagger;
    let labels = &a.labels;
    let results = futures::future::join_all(texts.iter().map(|t| async move {
        let req = TagRequest { title: t.clone(), candidate_labels: labels.clone(), ..Default::default() };
        tagger.tag(&req).await
    }))
    .await;
    for (t, r) in texts.iter().zip(results) {
        let r = r?;
        let preview: String = t.chars().take(60).collect();
        let tags: Vec<String> = r.tags.iter().map(|t| format!("{} {:.3}", t.label, t.score)).collect();
        println!("{preview:<60}  {}", if tags.is_empty() { r.no_tags_reason.unwrap_or_default() } else { tags.join(", ") });
    }
    Ok(())
}
