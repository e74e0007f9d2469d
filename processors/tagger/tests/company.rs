//! `precision: int8` with `batching.max_batch_size: 1` (the latency profile in docs/models.md):
//! an item's scores do not depend on which other items share the model with it, on the exported
//! model (scripts/setup writes models/).
//!
//! Dynamic int8 quantises activations with each batch's range, so the same item batched with
//! other items gets other scores; the control below shows that the comparison sees it.

use std::collections::HashMap;
use std::sync::Arc;

use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::config::Precision;
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

const TITLES: [&str; 24] = [
    "Striker scores twice as United win the cup final",
    "Shares fall as the central bank raises interest rates",
    "The prime minister faces a vote in parliament over the new tax plan",
    "A new smartphone with a faster chip and a better camera goes on sale",
    "Oscar nominations announced for this year's best picture",
    "Oil prices climb after the cartel agrees to cut output",
    "Tennis champion withdraws from the open with a knee injury",
    "Election campaign enters its final week with the parties level",
    "Chipmaker unveils a processor for artificial intelligence",
    "Rock band announces a reunion tour across Europe",
    "Retail sales slump in the run-up to the holidays",
    "Cricket side collapses on the opening day of the test",
    "Minister resigns over a leaked memo on immigration",
    "Social network fined for breaking data protection rules",
    "Film festival opens with a premiere from a veteran director",
    "Carmaker recalls a million vehicles over faulty brakes",
    "Marathon runner breaks the world record in Berlin",
    "Opposition leader calls for an inquiry into the contract",
    "Broadband speeds to double under the new network plan",
    "Singer tops the charts for a fifth week",
    "Bank reports record profits despite the downturn",
    "Rugby coach names a young squad for the autumn series",
    "Council votes to raise local taxes by five percent",
    "Video game sales beat expectations over the holiday season",
];

fn request(t: &str) -> TagRequest {
    TagRequest { title: t.into(), description: Some(format!("{t}. More on this story as it develops.")), ..Default::default() }
}

/// The repository's topology (the shipped defaults), with `over` merged into `tagging`.
fn config(over: &str) -> TaggerConfig {
    let mut topo = Topology::load(streamoasis_testkit::root().join("topology.yaml")).unwrap();
    let over: serde_yaml::Value = serde_yaml::from_str(over).unwrap();
    if let (Some(base), Some(over)) = (topo.file.tagging.as_mapping_mut(), over.as_mapping()) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    }
    TaggerConfig::from_topology(&topo).unwrap()
}

async fn scores_alone(tagger: &Tagger) -> Vec<HashMap<String, f32>> {
    let mut out = Vec::new();
    for t in TITLES {
        out.push(tagger.tag(&request(t)).await.unwrap().scores.into_iter().map(|s| (s.label, s.score)).collect());
    }
    out
}

/// Every title submitted at once: they queue together and, when the batcher may, share batches.
async fn scores_in_company(tagger: &Arc<Tagger>) -> Vec<HashMap<String, f32>> {
    let calls: Vec<_> = TITLES
        .iter()
        .map(|t| {
            let tagger = tagger.clone();
            tokio::spawn(async move { tagger.tag(&request(t)).await.unwrap().scores.into_iter().map(|s| (s.label, s.score)).collect::<HashMap<_, _>>() })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap());
    }
    out
}

fn largest_change(a: &[HashMap<String, f32>], b: &[HashMap<String, f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len(), "same labels scored");
        for (label, s) in x {
            worst = worst.max((s - y[label]).abs());
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbatched_int8_scores_an_item_the_same_alone_and_in_company() {
    let tagger = Arc::new(Tagger::load(config("{model: {path: models/all-MiniLM-L6-v2, precision: int8}, batching: {max_batch_size: 1}}")).await.unwrap());
    assert_eq!(tagger.config().model.precision, Precision::Int8);
    let alone = scores_alone(&tagger).await;
    for round in 0..3 {
        let together = scores_in_company(&tagger).await;
        assert_eq!(largest_change(&alone, &together), 0.0, "round {round}: scores must not move with company");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_int8_scores_do_move_with_company() {
    // The control: the same comparison with int8 batches of up to 32 (and a wait that lets the
    // titles meet in one batch) sees the per-batch activation scale.
    let tagger = Arc::new(Tagger::load(config("{model: {path: models/all-MiniLM-L6-v2, precision: int8}, batching: {max_batch_size: 32, max_wait: 50ms}}")).await.unwrap());
    let alone = scores_alone(&tagger).await;
    let together = scores_in_company(&tagger).await;
    let change = largest_change(&alone, &together);
    assert!(change > 1e-4, "batched int8 should move some score with company, largest change {change}");
}
