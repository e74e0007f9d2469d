//! Reading whole media and scoring it: the token budget → windows, relevance pooling of an
//! item's windows, calibration that does not depend on the label's name, and the evidence
//! rule of adaptive compute. Pure functions; `tagger.rs` wires them in.

use std::sync::Arc;

use crate::config::{Calibration, Pooling};

/// Windows of `window_tokens` tokens (special tokens included) sharing `stride` tokens that
/// cover `budget` content tokens contiguously (at least one).
///
/// The tagger reads text up to the budget whole; longer text gets this many windows, spread
/// over all of it (`placement: spread`) or from its start (`placement: head`).
pub fn windows_for_budget(budget: usize, window_tokens: usize, stride: usize) -> usize {
    let body = window_tokens.saturating_sub(2).max(1);
    let step = body.saturating_sub(stride).max(1);
    if budget <= body {
        1
    } else {
        (budget - body).div_ceil(step) + 1
    }
}

/// How sharply relevance pooling prefers the windows with the most evidence (cosine units:
/// a window whose evidence is 0.03 above another's gets e^(0.03·100) ≈ 20 times its weight).
pub const RELEVANCE_SHARPNESS: f32 = 100.0;

/// Each window's evidence for a label set. The window-label cosines are first contrasted with
/// the item's typical window (per label, the median over the item's windows), which removes
/// what every window shares (a recording's chatter leaning towards one label); a window's
/// evidence is then how much its best label stands out from its mean over the labels. A window
/// about one of the labels scores high; windows like most others score near zero.
pub fn window_evidence(rows: &[Vec<f32>], labels: &[Arc<Vec<f32>>]) -> Vec<f32> {
    if labels.is_empty() || rows.is_empty() {
        return vec![0.0; rows.len()];
    }
    let cos: Vec<Vec<f32>> = rows.iter().map(|r| labels.iter().map(|l| dot(r, l)).collect()).collect();
    let median: Vec<f32> = (0..labels.len())
        .map(|j| {
            let mut col: Vec<f32> = cos.iter().map(|c| c[j]).collect();
            col.sort_by(f32::total_cmp);
            let n = col.len();
            if n % 2 == 1 {
                col[n / 2]
            } else {
                (col[n / 2 - 1] + col[n / 2]) / 2.0
            }
        })
        .collect();
    cos.iter()
        .map(|c| {
            let d: Vec<f32> = c.iter().zip(&median).map(|(x, m)| x - m).collect();
            let best = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            best - d.iter().sum::<f32>() / d.len() as f32
        })
        .collect()
}

/// Pool an item's window embeddings into one L2-normalised embedding.
///
/// `Mean`: every window alike. `Relevance`: a softmax over the windows of
/// `RELEVANCE_SHARPNESS × evidence` (see [`window_evidence`]) weights the mean, so the windows
/// that speak about one of the candidate labels decide, however many windows of chatter
/// surround them. With one window both give that window.
pub fn pool(rows: &[Vec<f32>], labels: &[Arc<Vec<f32>>], pooling: Pooling) -> Vec<f32> {
    let weights: Vec<f32> = match pooling {
        Pooling::Mean => vec![1.0; rows.len()],
        Pooling::Relevance => {
            let ev: Vec<f32> = window_evidence(rows, labels).into_iter().map(|e| RELEVANCE_SHARPNESS * e).collect();
            let m = ev.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ev.iter().map(|e| (e - m).exp()).collect()
        }
    };
    weighted_mean(rows, &weights)
}

/// Weighted mean of vectors, L2-normalised.
pub fn weighted_mean(rows: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let mut acc = vec![0f32; rows.first().map_or(0, |r| r.len())];
    for (r, w) in rows.iter().zip(weights) {
        acc.iter_mut().zip(r).for_each(|(a, x)| *a += w * x);
    }
    let n = acc.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        acc.iter_mut().for_each(|x| *x /= n);
    }
    acc
}

/// The embeddings of a calibration's fitted labels (their names under the kind's templates).
pub type FittedLabels = Vec<(String, Arc<Vec<f32>>)>;

/// (slope, bias) of a label for a calibration: its own fitted pair when it has one; else the
/// fitted pairs carried over by label similarity ([`crate::config::Transfer`]), blended with
/// the global pair by how near the nearest fitted label is.
pub fn label_pair(c: &Calibration, name: &str, vector: &[f32], fitted: &[(String, Arc<Vec<f32>>)]) -> (f32, f32) {
    if let Some(p) = c.own_pair(name) {
        return p;
    }
    let t = &c.transfer;
    let known: Vec<(f32, (f32, f32))> = fitted.iter().filter_map(|(n, v)| c.own_pair(n).map(|p| (dot(vector, v), p))).collect();
    if !t.enabled || known.is_empty() {
        return (c.slope, c.bias);
    }
    let best = known.iter().map(|(s, _)| *s).fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = known.iter().map(|(s, _)| ((s - best) / t.temperature).exp()).collect();
    let total: f32 = w.iter().sum();
    let (a, b) = known.iter().zip(&w).fold((0.0, 0.0), |(a, b), ((_, p), w)| (a + w * p.0 / total, b + w * p.1 / total));
    let g = 1.0 / (1.0 + (-(best - t.min_similarity) / t.width).exp());
    (g * a + (1.0 - g) * c.slope, g * b + (1.0 - g) * c.bias)
}

/// The fitted labels that have their own pair, and each one's similarity to its nearest other
/// fitted label (how far apart the fitted categories are).
struct Known<'a> {
    names: Vec<&'a str>,
    vectors: Vec<&'a Arc<Vec<f32>>>,
    spacing: Vec<f32>,
}

impl<'a> Known<'a> {
    fn of(c: &Calibration, fitted: &'a [(String, Arc<Vec<f32>>)]) -> Self {
        let (names, vectors): (Vec<&str>, Vec<&Arc<Vec<f32>>>) = fitted.iter().filter(|(n, _)| c.own_pair(n).is_some()).map(|(n, v)| (n.as_str(), v)).unzip();
        let spacing =
            vectors.iter().enumerate().map(|(i, a)| vectors.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, b)| dot(a, b)).fold(f32::NEG_INFINITY, f32::max)).collect();
        Known { names, vectors, spacing }
    }

    /// Whether `v` is nearer to its nearest fitted label than any other fitted label is to it.
    fn specific(&self, v: &[f32]) -> bool {
        let nearest = self.vectors.iter().enumerate().map(|(j, f)| (j, dot(v, f))).max_by(|a, b| a.1.total_cmp(&b.1));
        nearest.is_some_and(|(j, s)| s >= self.spacing[j])
    }
}

/// Whether a label set takes carried pairs ([`crate::config::Transfer::min_specific`]): the
/// share of its labels without their own pair that are *specific* — nearer to their nearest
/// fitted label than any other fitted label is to that one — is at least `min_specific`.
/// With this model's prompts nearly every label is within 0.6 of some fitted one, so nearness
/// alone does not tell a renamed category ("sci-fi" → science fiction, 0.93, where science
/// fiction's nearest fitted neighbour is 0.77) from another kind of label ("business" →
/// thriller, 0.75, below thriller's 0.80). Judged per set, because scores of carried and global
/// pairs mixed in one ranking are not comparable.
pub fn set_takes_transfer(c: &Calibration, names: &[String], vectors: &[Arc<Vec<f32>>], fitted: &[(String, Arc<Vec<f32>>)]) -> bool {
    c.transfer.enabled && takes_transfer(c, &Known::of(c, fitted), names, vectors)
}

fn takes_transfer(c: &Calibration, known: &Known<'_>, names: &[String], vectors: &[Arc<Vec<f32>>]) -> bool {
    let t = &c.transfer;
    if !t.enabled || known.vectors.is_empty() {
        return false;
    }
    if t.min_specific <= 0.0 {
        return true;
    }
    let unfitted: Vec<&Arc<Vec<f32>>> = names.iter().zip(vectors).filter(|(n, _)| c.own_pair(n).is_none()).map(|(_, v)| v).collect();
    let specific = unfitted.iter().filter(|v| known.specific(v)).count();
    !unfitted.is_empty() && specific as f32 >= t.min_specific * unfitted.len() as f32
}

/// How a calibrated label set is scored: each label's (slope, bias), and the label vectors to
/// score with when some moved along a fitted direction or were anchored (`None`: the label
/// vectors as they are).
#[derive(Debug, Clone, PartialEq)]
pub struct SetCalibration {
    pub pairs: Vec<(f32, f32)>,
    pub anchored: Option<Vec<Vec<f32>>>,
}

/// Calibrate a label set: each label's (slope, bias) and the vector it scores with.
///
/// - A label with its own pair keeps it, and with a fitted direction
///   ([`crate::config::Calibration::directions`]) scores with `unit(v + weight × direction)`.
/// - When the set takes carried pairs ([`set_takes_transfer`]) each unfitted label gets
///   [`label_pair`], and each *specific* one (a fitted category under another name) also moves
///   its vector `transfer.anchor` of the way towards the fitted labels it renames (same softmax
///   weights and gate as the pair; their moved vectors where they have directions): a
///   paraphrase's own prompt ranks items less well than the name it stands for.
/// - Otherwise unfitted labels take the global pair and keep their vectors.
pub fn calibrate_set(c: &Calibration, names: &[String], vectors: &[Arc<Vec<f32>>], fitted: &[(String, Arc<Vec<f32>>)]) -> SetCalibration {
    let known = if c.transfer.enabled { Known::of(c, fitted) } else { Known { names: Vec::new(), vectors: Vec::new(), spacing: Vec::new() } };
    let transfer = takes_transfer(c, &known, names, vectors);
    let pairs = names.iter().zip(vectors).map(|(n, v)| if transfer { label_pair(c, n, v, fitted) } else { c.pair(n) }).collect();
    let t = &c.transfer;
    // Where the specific labels anchor: the fitted labels, moved along their directions.
    let targets: Vec<Vec<f32>> =
        if transfer && t.anchor > 0.0 { known.names.iter().zip(&known.vectors).map(|(n, v)| along_direction(c, n, v).unwrap_or_else(|| v.to_vec())).collect() } else { Vec::new() };
    let mut moved = false;
    let scored = names
        .iter()
        .zip(vectors)
        .map(|(n, v)| {
            if c.own_pair(n).is_some() {
                return along_direction(c, n, v).inspect(|_| moved = true).unwrap_or_else(|| v.to_vec());
            }
            if targets.is_empty() || !known.specific(v) {
                return v.to_vec();
            }
            let sims: Vec<f32> = known.vectors.iter().map(|f| dot(v, f)).collect();
            let best = sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = sims.iter().map(|s| ((s - best) / t.temperature).exp()).collect();
            let total: f32 = w.iter().sum();
            let g = 1.0 / (1.0 + (-(best - t.min_similarity) / t.width).exp());
            let k = t.anchor * g;
            let mut out: Vec<f32> = v.iter().map(|x| (1.0 - k) * x).collect();
            for (f, wj) in targets.iter().zip(&w) {
                out.iter_mut().zip(f.iter()).for_each(|(o, x)| *o += k * wj / total * x);
            }
            moved = true;
            unit_in_place(out)
        })
        .collect();
    SetCalibration { pairs, anchored: moved.then_some(scored) }
}

/// A fitted label's vector moved along its fitted direction, `unit(v + weight × direction)`;
/// `None` when the calibration has no direction for the label.
pub fn along_direction(c: &Calibration, name: &str, v: &[f32]) -> Option<Vec<f32>> {
    let (d, weight) = c.direction(name)?;
    if d.len() != v.len() {
        return None;
    }
    Some(unit_in_place(v.iter().zip(d).map(|(x, y)| x + weight * y).collect()))
}

fn unit_in_place(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Calibrated multi-label scores: `sigmoid(slope_l * (cos_l - mean cos) + bias_l)` per label,
/// with each label's pair from [`label_pair`].
pub fn calibrated_scores(cos: &[f32], pairs: &[(f32, f32)]) -> Vec<f32> {
    let mean = cos.iter().sum::<f32>() / cos.len().max(1) as f32;
    cos.iter().zip(pairs).map(|(x, (a, b))| 1.0 / (1.0 + (-(a * (x - mean) + b)).exp())).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// English function words, and words that name a piece of media without saying what it is
/// about ("Episode 12", "Part 3: Live"): neither is evidence of a subject.
const UNINFORMATIVE: &[&str] = &[
    "the",
    "and",
    "for",
    "with",
    "from",
    "that",
    "this",
    "these",
    "those",
    "are",
    "was",
    "were",
    "been",
    "being",
    "have",
    "has",
    "had",
    "not",
    "but",
    "its",
    "his",
    "her",
    "hers",
    "their",
    "them",
    "they",
    "you",
    "your",
    "our",
    "ours",
    "who",
    "whom",
    "what",
    "which",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "into",
    "onto",
    "over",
    "under",
    "about",
    "after",
    "before",
    "than",
    "then",
    "there",
    "here",
    "also",
    "just",
    "only",
    "very",
    "more",
    "most",
    "some",
    "such",
    "one",
    "two",
    "three",
    "out",
    "off",
    "again",
    "ever",
    "every",
    "each",
    "did",
    "does",
    "doing",
    "done",
    "she",
    "him",
    "himself",
    "herself",
    "itself",
    "yourself",
    "myself",
    "ourselves",
    "themselves",
    "let",
    "lets",
    "get",
    "got",
    "now",
    "new",
    "via",
    "per",
    "yet",
    "too",
    "own",
    "same",
    "other",
    "both",
    "few",
    "many",
    "much",
    "because",
    "while",
    "until",
    "upon",
    "between",
    // generic media words
    "episode",
    "episodes",
    "ep",
    "part",
    "parts",
    "chapter",
    "season",
    "series",
    "volume",
    "vol",
    "issue",
    "untitled",
    "video",
    "videos",
    "clip",
    "clips",
    "podcast",
    "show",
    "live",
    "stream",
    "recording",
    "audio",
    "full",
    "official",
    "trailer",
    "teaser",
    "highlights",
    "update",
    "edition",
    "special",
    "bonus",
    "intro",
    "introduction",
    "session",
    "week",
    "weekly",
    "daily",
    "day",
    "today",
    "tonight",
    "morning",
    "night",
    "number",
    "draft",
    "final",
    "version",
    "copy",
    "file",
    "untitled",
    "media",
    "item",
    "content",
    "watch",
    "listen",
    "welcome",
    "hello",
];

/// Informative tokens of a text: words of at least 3 letters that are neither function words
/// nor generic media words, and not numbers. "Episode 12" has none; a film's bare name has
/// one or two; a description sentence has several.
pub fn informative_tokens(text: &str) -> usize {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| w.chars().filter(|c| c.is_alphabetic()).count() >= 3)
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .filter(|w| !UNINFORMATIVE.contains(&w.as_str()))
        .count()
}

/// The evidence half of adaptive compute's rule: the body may be skipped only when the item
/// has a description and its title + description carry at least `min_tokens` informative
/// tokens. `min_tokens == 0` turns the evidence check off (the margin alone decides, the rule
/// before it existed).
pub fn lead_has_evidence(title: &str, description: Option<&str>, min_tokens: usize) -> bool {
    evidence_suffices(lead_evidence(title, description), min_tokens)
}

/// Informative tokens of title + description; None when there is no description.
pub fn lead_evidence(title: &str, description: Option<&str>) -> Option<usize> {
    let d = description.map(str::trim).filter(|d| !d.is_empty())?;
    Some(informative_tokens(title) + informative_tokens(d))
}

/// [`lead_has_evidence`] from the counted evidence ([`lead_evidence`]).
pub fn evidence_suffices(evidence: Option<usize>, min_tokens: usize) -> bool {
    min_tokens == 0 || evidence.is_some_and(|n| n >= min_tokens)
}

/// Adaptive compute's whole rule: evidence in the lead ([`lead_has_evidence`]) and a margin of
/// at least `min_margin` between the lead's two best calibrated scores.
pub fn lead_is_decisive(title: &str, description: Option<&str>, min_tokens: usize, calibrated_margin: f32, min_margin: f32) -> bool {
    lead_has_evidence(title, description, min_tokens) && calibrated_margin >= min_margin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transfer;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn budget_pays_for_contiguous_windows() {
        // 256-token windows hold 254 content tokens, 222 new ones each after the first.
        assert_eq!(windows_for_budget(10, 256, 32), 1);
        assert_eq!(windows_for_budget(254, 256, 32), 1);
        assert_eq!(windows_for_budget(255, 256, 32), 2);
        assert_eq!(windows_for_budget(254 + 222, 256, 32), 2);
        assert_eq!(windows_for_budget(254 + 222 + 1, 256, 32), 3);
        // The default budget, an hour of speech: 54 windows of 256 tokens.
        assert_eq!(windows_for_budget(12_000, 256, 32), 54);
        // Degenerate settings never give zero windows or divide by zero.
        assert_eq!(windows_for_budget(100, 2, 32), 100);
    }

    #[test]
    fn relevance_pooling_is_not_outvoted_by_chatter() {
        let labels: Vec<Arc<Vec<f32>>> = vec![Arc::new(unit(&[1.0, 0.0, 0.0])), Arc::new(unit(&[0.0, 1.0, 0.0]))];
        // One window about label 0, ten windows of chatter leaning weakly towards label 1.
        let mut rows = vec![unit(&[0.9, 0.1, 0.3])];
        rows.extend(std::iter::repeat_n(unit(&[0.05, 0.25, 1.0]), 10));
        let cos = |v: &[f32]| (dot(v, &labels[0]), dot(v, &labels[1]));
        let (m0, m1) = cos(&pool(&rows, &labels, Pooling::Mean));
        assert!(m1 > m0, "the mean follows the chatter: {m0} {m1}");
        let (r0, r1) = cos(&pool(&rows, &labels, Pooling::Relevance));
        assert!(r0 > r1 + 0.3, "relevance pooling follows the window about the subject: {r0} {r1}");
        // One window: both poolings give it back.
        let one = vec![unit(&[0.3, 0.4, 0.5])];
        for p in [Pooling::Mean, Pooling::Relevance] {
            let v = pool(&one, &labels, p);
            assert!(v.iter().zip(&one[0]).all(|(a, b)| (a - b).abs() < 1e-6));
        }
        // Windows with equal evidence are averaged as the mean would.
        let twins = vec![unit(&[1.0, 0.0, 0.2]), unit(&[1.0, 0.0, -0.2])];
        let (a, b) = (pool(&twins, &labels, Pooling::Relevance), pool(&twins, &labels, Pooling::Mean));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn generic_titles_carry_no_evidence() {
        assert_eq!(informative_tokens("Episode 12"), 0);
        assert_eq!(informative_tokens("Part 3: Live at 9pm - full recording"), 0);
        assert_eq!(informative_tokens("Avatar"), 1);
        assert!(informative_tokens("Stefan Koubek says he has been banned for three months by the International Tennis Federation") >= 8);
        // No description: always read the body, whatever the margin.
        assert!(!lead_is_decisive("Koubek suspended after drugs test ruling by the tennis federation", None, 8, 0.9, 0.5));
        assert!(!lead_is_decisive("Episode 12", Some("  "), 8, 0.9, 0.5));
        // A description with too few informative tokens: read the body.
        assert!(!lead_is_decisive("Episode 12", Some("This week: more of the same."), 8, 0.9, 0.5));
        let d = Some("Stefan Koubek says he has been banned for three months by the International Tennis Federation.");
        assert!(lead_is_decisive("Koubek suspended", d, 8, 0.6, 0.5));
        assert!(!lead_is_decisive("Koubek suspended", d, 8, 0.4, 0.5), "evidence without a margin is not enough");
        // 0 informative tokens required: the margin alone decides (the rule before).
        assert!(lead_is_decisive("Episode 12", None, 0, 0.6, 0.5));
    }

    #[test]
    fn calibration_transfers_to_near_label_names() {
        let c = Calibration {
            slope: 10.0,
            bias: -2.0,
            labels: [("science fiction".to_string(), (30.0, -3.0)), ("drama".to_string(), (8.0, 0.0))].into_iter().collect(),
            transfer: Transfer::default(),
            ..Default::default()
        };
        let fitted: FittedLabels = vec![("science fiction".into(), Arc::new(unit(&[1.0, 0.0, 0.0]))), ("drama".into(), Arc::new(unit(&[0.0, 1.0, 0.0])))];
        // A fitted name keeps its own pair, whatever its vector.
        assert_eq!(label_pair(&c, "Drama", &unit(&[0.0, 0.0, 1.0]), &fitted), (8.0, 0.0));
        // A paraphrase near one fitted label takes (nearly) its pair.
        let (a, b) = label_pair(&c, "sci-fi", &unit(&[0.95, 0.05, 0.3]), &fitted);
        assert!((a - 30.0).abs() < 0.5 && (b + 3.0).abs() < 0.1, "{a} {b}");
        // A label far from every fitted one gets the global pair.
        let (a, b) = label_pair(&c, "budget airlines", &unit(&[0.1, 0.1, 1.0]), &fitted);
        assert!((a - 10.0).abs() < 0.01 && (b + 2.0).abs() < 0.01, "{a} {b}");
        // Transfer off: the global pair, as before.
        let off = Calibration { transfer: Transfer { enabled: false, ..Transfer::default() }, ..c.clone() };
        assert_eq!(label_pair(&off, "sci-fi", &unit(&[0.95, 0.05, 0.3]), &fitted), (10.0, -2.0));
        // The set decides: fitted labels at 0.8 from each other (each one's nearest fitted neighbour);
        // renamed ones nearer than that are carried, a set of mostly other labels is not.
        let c2 = Calibration { labels: [("science fiction".to_string(), (30.0, -3.0)), ("drama".to_string(), (8.0, 0.0))].into_iter().collect(), ..c.clone() };
        let fitted2: FittedLabels = vec![("science fiction".into(), Arc::new(unit(&[1.0, 0.0, 0.0]))), ("drama".into(), Arc::new(unit(&[0.8, 0.6, 0.0])))];
        let v = |x: &[f32]| Arc::new(unit(x));
        let renamed = (vec!["sci-fi".to_string(), "emotional story".to_string()], vec![v(&[0.95, 0.05, 0.3]), v(&[0.5, 0.85, 0.1])]);
        assert!(set_takes_transfer(&c2, &renamed.0, &renamed.1, &fitted2));
        let cal = calibrate_set(&c2, &renamed.0, &renamed.1, &fitted2);
        let pairs = &cal.pairs;
        assert!((pairs[0].0 - 30.0).abs() < 0.5 && (pairs[1].0 - 8.0).abs() < 0.5, "{pairs:?}");
        // "business" and "politics" are within the gate of some fitted label (0.62 each) but
        // not nearer than the fitted labels are to each other: with "sci-fi" one of three, the
        // set keeps the global pair for all three; a fitted name keeps its own.
        let other = (
            vec!["sci-fi".to_string(), "business".to_string(), "politics".to_string(), "drama".to_string()],
            vec![v(&[0.95, 0.05, 0.3]), v(&[0.62, 0.0, 0.78]), v(&[0.4, 0.5, 0.77]), v(&[0.8, 0.6, 0.0])],
        );
        assert!(dot(&other.1[1], &fitted2[0].1) > 0.6 && dot(&other.1[2], &fitted2[1].1) > 0.6);
        assert!(!set_takes_transfer(&c2, &other.0, &other.1, &fitted2));
        assert_eq!(calibrate_set(&c2, &other.0, &other.1, &fitted2), SetCalibration { pairs: vec![(10.0, -2.0), (10.0, -2.0), (10.0, -2.0), (8.0, 0.0)], anchored: None });
        // Anchoring: in the renamed set both labels are specific and move towards their fitted
        // category (75% of the way at a gate of ~1); with anchor 0 they are left alone.
        let moved = cal.anchored.as_ref().expect("a renamed set's specific labels are anchored");
        for (i, f) in [(0usize, &fitted2[0].1), (1, &fitted2[1].1)] {
            let (before, after) = (dot(&renamed.1[i], f), dot(&moved[i], f));
            assert!(after > before && after > 0.98, "label {i}: {before} -> {after}");
            assert!((moved[i].iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let no_anchor = Calibration { transfer: Transfer { anchor: 0.0, ..Transfer::default() }, ..c2.clone() };
        assert_eq!(calibrate_set(&no_anchor, &renamed.0, &renamed.1, &fitted2).anchored, None);
        // min_specific 0: the earlier rule, every label carried by similarity alone.
        let always = Calibration { transfer: Transfer { min_specific: 0.0, ..Transfer::default() }, ..c2.clone() };
        assert!(set_takes_transfer(&always, &other.0, &other.1, &fitted2));
        // Fitted directions: a fitted label scores with unit(v + weight x direction), also in a
        // set that takes no transfer; a renamed label anchors towards the moved vector.
        let d = crate::config::Directions {
            model: "m".into(),
            weights_sha256: None,
            dims: 3,
            weight: 1.0,
            labels: [("science fiction".to_string(), vec![0.0, 0.0, 1.0])].into_iter().collect(),
            sha256: String::new(),
        };
        let cd = Calibration { loaded_directions: Some(Arc::new(d)), ..c2.clone() };
        let seen = calibrate_set(&cd, &["Science Fiction".to_string(), "drama".to_string()], &[v(&[1.0, 0.0, 0.0]), v(&[0.8, 0.6, 0.0])], &fitted2);
        let s = 0.5f32.sqrt();
        assert_eq!(seen.pairs, vec![(30.0, -3.0), (8.0, 0.0)]);
        let moved = seen.anchored.expect("the fitted label with a direction moved");
        assert!(moved[0].iter().zip([s, 0.0, s]).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", moved[0]);
        assert_eq!(moved[1], unit(&[0.8, 0.6, 0.0]), "no direction: its own vector");
        let renamed_d = calibrate_set(&cd, &renamed.0, &renamed.1, &fitted2).anchored.unwrap();
        let plain = cal.anchored.as_ref().unwrap();
        assert!(renamed_d[0][2] > plain[0][2] + 0.3, "sci-fi anchors towards science fiction moved along z: {:?} vs {:?}", renamed_d[0], plain[0]);
        assert_eq!(renamed_d[1], plain[1], "emotional story renames drama, which has no direction");
        // Scores: per-item normalisation (cos minus the item's mean over its candidates), so
        // adding a constant to every cosine leaves them unchanged.
        let pairs = [(10.0, 0.0), (10.0, 0.0)];
        let s1 = calibrated_scores(&[0.3, 0.5], &pairs);
        let s2 = calibrated_scores(&[0.6, 0.8], &pairs);
        assert!(s1.iter().zip(&s2).all(|(x, y)| (x - y).abs() < 1e-6));
        assert!((s1[1] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }
}
