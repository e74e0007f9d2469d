//! `streamoasis compare --shadow <topology>`: how a candidate configuration's tags (a shadow
//! tagger and sink writing their own topic and keyspace) agree with the live ones, read from the
//! two keyspaces' `media_tags`: top-1 agreement, each label's precision and recall taking the
//! live tags as the reference, and the items on which the two disagree most.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use streamoasis_pipeline::topology::Topology;
use streamoasis_sink::SinkConfig;

use super::load;
use crate::cli::{Common, CompareArgs};

/// One item's stored tags and title.
pub type Stored = (HashMap<String, f32>, Option<String>);

/// One label: how often each side gives it and how the shadow's agree with the live ones.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelAgreement {
    /// Items (in both tables) the live tags give it.
    pub live: usize,
    /// Items the shadow gives it.
    pub shadow: usize,
    /// Items both give it.
    pub both: usize,
    /// Of the shadow's, the share the live tags give too (`None` when the shadow gives none).
    pub precision: Option<f64>,
    /// Of the live tags', the share the shadow gives too (`None` when the live tags give none).
    pub recall: Option<f64>,
}

/// One item on which the two disagree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disagreement {
    /// The item.
    pub media_id: String,
    /// Its title.
    pub title: Option<String>,
    /// Sum over labels of the score difference (a label one side does not give counts as 0).
    pub distance: f64,
    /// Live tags, best first.
    pub live: Vec<(String, f32)>,
    /// Shadow tags, best first.
    pub shadow: Vec<(String, f32)>,
}

/// The comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Items stored by both.
    pub both: usize,
    /// Items only the live table has (the shadow has not tagged them yet).
    pub live_only: usize,
    /// Items only the shadow table has.
    pub shadow_only: usize,
    /// Items (in both) whose best tag is the same, both without tags included.
    pub top1_agree: usize,
    /// `top1_agree / both`.
    pub top1_agreement: Option<f64>,
    /// Per label, by name.
    pub labels: BTreeMap<String, LabelAgreement>,
    /// The largest disagreements: a different best tag first, then the score distance.
    pub disagreements: Vec<Disagreement>,
}

fn sorted(tags: &HashMap<String, f32>) -> Vec<(String, f32)> {
    let mut v: Vec<(String, f32)> = tags.iter().map(|(l, s)| (l.clone(), *s)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn ratio(n: usize, d: usize) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// Compare the two tables' items (pure; `examples` disagreements kept).
pub fn compare(live: &HashMap<String, Stored>, shadow: &HashMap<String, Stored>, examples: usize) -> Report {
    let mut labels: BTreeMap<String, LabelAgreement> = BTreeMap::new();
    let (mut both, mut top1_agree) = (0, 0);
    let mut diffs: Vec<(bool, Disagreement)> = Vec::new();
    for (id, (lt, title)) in live {
        let Some((st, _)) = shadow.get(id) else { continue };
        both += 1;
        let (ls, ss) = (sorted(lt), sorted(st));
        let same_top = ls.first().map(|t| &t.0) == ss.first().map(|t| &t.0);
        top1_agree += usize::from(same_top);
        let names: BTreeSet<&String> = lt.keys().chain(st.keys()).collect();
        let mut distance = 0.0;
        for name in names {
            let (l, s) = (lt.get(name), st.get(name));
            let e = labels.entry(name.clone()).or_insert(LabelAgreement { live: 0, shadow: 0, both: 0, precision: None, recall: None });
            e.live += usize::from(l.is_some());
            e.shadow += usize::from(s.is_some());
            e.both += usize::from(l.is_some() && s.is_some());
            distance += (f64::from(l.copied().unwrap_or(0.0)) - f64::from(s.copied().unwrap_or(0.0))).abs();
        }
        if !same_top || distance > 0.0 {
            diffs.push((!same_top, Disagreement { media_id: id.clone(), title: title.clone(), distance, live: ls, shadow: ss }));
        }
    }
    for e in labels.values_mut() {
        e.precision = ratio(e.both, e.shadow);
        e.recall = ratio(e.both, e.live);
    }
    diffs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.distance.total_cmp(&a.1.distance)).then_with(|| a.1.media_id.cmp(&b.1.media_id)));
    Report {
        both,
        live_only: live.len() - both,
        shadow_only: shadow.keys().filter(|k| !live.contains_key(*k)).count(),
        top1_agree,
        top1_agreement: ratio(top1_agree, both),
        labels,
        disagreements: diffs.into_iter().take(examples).map(|d| d.1).collect(),
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

fn tags_line(t: &[(String, f32)]) -> String {
    if t.is_empty() {
        return "(no tags)".into();
    }
    t.iter().map(|(l, s)| format!("{l} {s:.2}")).collect::<Vec<_>>().join(", ")
}

pub(super) async fn run(c: &Common, a: CompareArgs) -> anyhow::Result<()> {
    let live_cfg = SinkConfig::from_topology(&load(c)?)?;
    let shadow_cfg = SinkConfig::from_topology(&Topology::load(&a.shadow)?)?;
    anyhow::ensure!(
        live_cfg.keyspace != shadow_cfg.keyspace,
        "--shadow {} writes to the live keyspace '{}': give the shadow its own scylla.keyspace (docs/operations.md, \"Shadow, compare, cut over\")",
        a.shadow.display(),
        live_cfg.keyspace
    );
    let session = streamoasis_sink::connect(&c.scylla, &live_cfg).await?;
    let live = streamoasis_sink::read::all_tags(&session, &live_cfg.keyspace).await?;
    let shadow = streamoasis_sink::read::all_tags(&session, &shadow_cfg.keyspace).await?;
    let r = compare(&live, &shadow, a.examples);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("live {} ({} items), shadow {} ({} items)", live_cfg.keyspace, live.len(), shadow_cfg.keyspace, shadow.len());
    println!("in both {}; only live {}; only shadow {}", r.both, r.live_only, r.shadow_only);
    println!("top-1 agreement {} ({} of {})", pct(r.top1_agreement), r.top1_agree, r.both);
    println!("\n{:<28} {:>7} {:>7} {:>7} {:>10} {:>8}", "label", "live", "shadow", "both", "precision", "recall");
    for (name, l) in &r.labels {
        println!("{name:<28} {:>7} {:>7} {:>7} {:>10} {:>8}", l.live, l.shadow, l.both, pct(l.precision), pct(l.recall));
    }
    if !r.disagreements.is_empty() {
        println!("\nlargest disagreements (a different best tag first, then the score distance):");
        for d in &r.disagreements {
            println!("  {} {}  (distance {:.2})", d.media_id, d.title.as_deref().map(|t| format!("\"{t}\"")).unwrap_or_default(), d.distance);
            println!("    live:   {}", tags_line(&d.live));
            println!("    shadow: {}", tags_line(&d.shadow));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(tags: &[(&str, f32)]) -> Stored {
        (tags.iter().map(|(l, s)| (l.to_string(), *s)).collect(), None)
    }

    #[test]
    fn agreement_precision_recall_and_the_largest_disagreements() {
        let live: HashMap<String, Stored> = [
            ("a", item(&[("sport", 0.9), ("business", 0.3)])),
            ("b", item(&[("business", 0.8)])),
            ("c", item(&[("tech", 0.7)])),
            ("d", item(&[])),
            ("only-live", item(&[("sport", 0.5)])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let shadow: HashMap<String, Stored> = [
            ("a", item(&[("sport", 0.9), ("business", 0.3)])),
            ("b", item(&[("business", 0.6), ("tech", 0.2)])),
            ("c", item(&[("business", 0.5)])),
            ("d", item(&[])),
            ("only-shadow", item(&[("tech", 0.5)])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let r = compare(&live, &shadow, 10);
        assert_eq!((r.both, r.live_only, r.shadow_only, r.top1_agree), (4, 1, 1, 3), "a, b and d (both untagged) agree at top-1");
        assert_eq!(r.top1_agreement, Some(0.75));
        let b = &r.labels["business"];
        assert_eq!((b.live, b.shadow, b.both), (2, 3, 2));
        assert_eq!((b.precision, b.recall), (Some(2.0 / 3.0), Some(1.0)));
        let t = &r.labels["tech"];
        assert_eq!((t.live, t.shadow, t.both, t.precision, t.recall), (1, 1, 0, Some(0.0), Some(0.0)));
        assert_eq!(r.labels["sport"].precision, Some(1.0));
        let ids: Vec<&str> = r.disagreements.iter().map(|d| d.media_id.as_str()).collect();
        assert_eq!(ids, ["c", "b"], "a different best tag first; identical items are not listed");
        assert!((r.disagreements[0].distance - 1.2).abs() < 1e-6);
        assert!((r.disagreements[1].distance - 0.4).abs() < 1e-6);
        assert_eq!(compare(&live, &shadow, 1).disagreements.len(), 1);
    }
}
