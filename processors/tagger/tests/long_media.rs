//! Whole long media on the exported model (scripts/setup writes models/): the token budget,
//! relevance pooling under a generic title, the evidence rule, and the `text` keys' errors.

use std::path::PathBuf;

use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

fn model_dir() -> PathBuf {
    std::env::var_os("STREAMOASIS_MODELS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models"))).join("all-MiniLM-L6-v2")
}

fn parse(yaml: &str) -> Result<TaggerConfig, String> {
    let text = format!("model: {{path: {}, threads: 2}}\n{yaml}", model_dir().display());
    let cfg: TaggerConfig = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    cfg.validate("test").map_err(|e| e.to_string())?;
    Ok(cfg)
}

const NEWS: &str = "embedding: {templates: ['A news story about {label}.']}\nlabels: [{name: business}, {name: sport}, {name: politics}, {name: technology}]";

#[test]
fn text_keys_are_validated_by_name() {
    let e = parse(&format!("text: {{max_windows: 4}}\n{NEWS}")).unwrap_err();
    assert!(e.contains("tagging.text.max_windows") && e.contains("max_tokens_per_item"), "{e}");
    let e = parse(&format!("text: {{max_tokens_per_item: 4}}\n{NEWS}")).unwrap_err();
    assert!(e.contains("tagging.text.max_tokens_per_item"), "{e}");
    let e = parse(&format!("text: {{pooling: max}}\n{NEWS}")).unwrap_err();
    assert!(e.contains("pooling") || e.contains("relevance"), "{e}");
    let e = parse("embedding: {multi_label: true, calibration: {slope: 1, bias: 0, transfer: {temperature: 0}}}\nlabels: [{name: a}]").unwrap_err();
    assert!(e.contains("tagging.embedding.calibration.transfer.temperature"), "{e}");
    let cfg = parse(NEWS).unwrap();
    assert_eq!(cfg.text.max_tokens_per_item, 12_000);
}

/// An hour-long transcript under "Episode 12" whose subject comes after ~8,000 tokens of
/// chatter: read whole (the default budget) and pooled by relevance, it is tagged by its
/// subject; the previous reading (4 windows, mean) is not asserted, only reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_of_an_hour_is_found_under_a_generic_title() {
    let chatter = "Hello and welcome back, everyone. Let me just check that the microphone is working. \
        I've got my coffee, so I think we're ready. Sorry about the noise outside. Right then. ";
    let subject = "The striker scored twice in the second half as the club won the cup final. \
        The goalkeeper saved a penalty and the coach praised the players after the match, \
        saying the team had fought for every ball in front of a full stadium. ";
    let transcript = format!("{}{}{}", chatter.repeat(180), subject.repeat(3), chatter.repeat(20));
    let tagger = Tagger::load(parse(NEWS).unwrap()).await.unwrap();
    assert_eq!(tagger.window_count().unwrap(), 54);
    let req = TagRequest { title: "Episode 12".into(), transcript: Some(transcript.clone()), ..Default::default() };
    let r = tagger.tag(&req).await.unwrap();
    assert_eq!(r.tags[0].label, "sport", "{:?}", r.scores);
    let before = Tagger::load(parse(&format!("text: {{max_tokens_per_item: 920, pooling: mean, min_evidence_tokens: 0}}\n{NEWS}")).unwrap()).await.unwrap();
    let b = before.tag(&req).await.unwrap();
    eprintln!("previous reading (4 windows, mean): {:?}", b.scores.first());
}
