//! The events that cross topics, as Rust types.
//!
//! The Avro schemas in `schemas/*.avsc` are the source of truth; these types mirror them and a
//! test round-trips every field through the schema so that drift fails the build's tests.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::Schema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// `schemas/media_ingested.avsc`, embedded at compile time.
pub const MEDIA_INGESTED_AVSC: &str = include_str!("../../../schemas/media_ingested.avsc");
/// `schemas/media_tagged.avsc`, embedded at compile time.
pub const MEDIA_TAGGED_AVSC: &str = include_str!("../../../schemas/media_tagged.avsc");

/// A record type carried on a topic in Avro.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The Avro schema text (JSON) this type mirrors.
    const AVSC: &'static str;
    /// Record key on Kafka (events are keyed by media id).
    fn key(&self) -> &str;
    /// The parsed reader schema, parsed once.
    fn schema() -> &'static Schema;
    /// When the item entered the pipeline (ms since the epoch), for end-to-end latency.
    fn ingested_at_ms(&self) -> Option<i64> {
        None
    }
}

macro_rules! event_schema {
    ($avsc:expr) => {{
        static SCHEMA: OnceLock<Schema> = OnceLock::new();
        SCHEMA.get_or_init(|| Schema::parse_str($avsc).expect("embedded schema is valid Avro"))
    }};
}

/// Kind of media item. Unknown future symbols decode as `Other` (the schema's enum default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MediaKind {
    Video,
    Episode,
    Movie,
    Clip,
    Trailer,
    Live,
    Podcast,
    Article,
    Attraction,
    #[default]
    Other,
}

impl MediaKind {
    /// The Avro symbol (and serde name), e.g. `ATTRACTION`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Video => "VIDEO",
            MediaKind::Episode => "EPISODE",
            MediaKind::Movie => "MOVIE",
            MediaKind::Clip => "CLIP",
            MediaKind::Trailer => "TRAILER",
            MediaKind::Live => "LIVE",
            MediaKind::Podcast => "PODCAST",
            MediaKind::Article => "ARTICLE",
            MediaKind::Attraction => "ATTRACTION",
            MediaKind::Other => "OTHER",
        }
    }
}

impl MediaKind {
    /// Every kind, in the schema's symbol order.
    pub const ALL: [MediaKind; 10] = [
        MediaKind::Video,
        MediaKind::Episode,
        MediaKind::Movie,
        MediaKind::Clip,
        MediaKind::Trailer,
        MediaKind::Live,
        MediaKind::Podcast,
        MediaKind::Article,
        MediaKind::Attraction,
        MediaKind::Other,
    ];
}

impl std::str::FromStr for MediaKind {
    type Err = String;
    /// From the Avro symbol ([`MediaKind::as_str`]).
    fn from_str(s: &str) -> Result<Self, String> {
        MediaKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| format!("unknown media kind '{s}'"))
    }
}

/// One media item to tag (`media.ingested`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaIngested {
    /// Stable identifier; the key of every derived record and row.
    pub media_id: String,
    /// What sort of media item this is.
    pub kind: MediaKind,
    /// Display title.
    pub title: String,
    /// Synopsis or summary.
    pub description: Option<String>,
    /// Full text: transcript, article body, subtitles.
    pub transcript: Option<String>,
    /// BCP 47 language tag, if known.
    pub language: Option<String>,
    /// Name of the producing system.
    pub source: String,
    /// Ingest time, milliseconds since the Unix epoch (UTC).
    pub ingested_at: i64,
    /// Free-form producer metadata.
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    /// Per-item label set replacing the taxonomy; `None` uses the taxonomy.
    pub candidate_labels: Option<Vec<String>>,
}

impl Event for MediaIngested {
    const AVSC: &'static str = MEDIA_INGESTED_AVSC;
    fn key(&self) -> &str {
        &self.media_id
    }
    fn schema() -> &'static Schema {
        event_schema!(MEDIA_INGESTED_AVSC)
    }
    fn ingested_at_ms(&self) -> Option<i64> {
        Some(self.ingested_at)
    }
}

/// One label and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tag {
    /// Label name.
    pub label: String,
    /// Score in [0, 1], higher is more confident.
    pub score: f32,
}

/// Zero-shot strategy that produced the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    /// Bi-encoder similarity between the item and label prompts.
    Embedding,
    /// Natural-language-inference cross-encoder (entailment of "This is about {label}.").
    Nli,
}

impl Strategy {
    /// The Avro symbol (and serde name): `EMBEDDING` or `NLI`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Embedding => "EMBEDDING",
            Strategy::Nli => "NLI",
        }
    }
}

/// Model identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Package version or content hash.
    pub version: String,
}

/// Coordinates of the input record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
}

/// Tags for one media item (`media.tagged`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaTagged {
    /// Identifier of the tagged item (also the record key).
    pub media_id: String,
    /// Kind copied from the input.
    pub kind: MediaKind,
    /// Tags sorted by score, highest first.
    pub tags: Vec<Tag>,
    /// Why `tags` is empty, if it is.
    pub no_tags_reason: Option<String>,
    /// Strategy used.
    pub strategy: Strategy,
    /// Model used.
    pub model: ModelRef,
    /// Copied from the input, ms since the epoch.
    pub ingested_at: i64,
    /// When the tagger produced this event, ms since the epoch.
    pub tagged_at: i64,
    /// Input record coordinates.
    pub lineage: Lineage,
    /// Title copied from the input (null in events written before it was carried).
    #[serde(default)]
    pub title: Option<String>,
    /// Source system copied from the input.
    #[serde(default)]
    pub source: Option<String>,
    /// Language copied from the input.
    #[serde(default)]
    pub language: Option<String>,
    /// Attributes copied from the input untouched.
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    /// Stable hash of the taxonomy that produced the tags (labels, templates, calibration,
    /// thresholds; null in events written before it was carried). With `model`, it says whether
    /// the tags are stale after a change.
    #[serde(default)]
    pub taxonomy_version: Option<String>,
    /// What the model read of the item (`tagging.store_embeddings`; null when off, for the NLI
    /// strategy, and in events written before it was carried). The sink stores it in
    /// `media_embeddings`.
    #[serde(default)]
    pub embedding: Option<ItemEmbedding>,
}

/// The window embeddings an item was scored from, with what adaptive compute decided on: enough
/// to score it again under another taxonomy without the model (`retag --from-embeddings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemEmbedding {
    /// Model and windowing the rows were computed with; rows of another version are not reused.
    pub embedding_version: String,
    /// Hash of the title + description and the whole text that were read.
    pub text_hash: String,
    /// Floats per row.
    pub dim: i32,
    /// Rows of the lead (title + description), when adaptive compute read it: little-endian f32.
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub lead: Option<Vec<u8>>,
    /// Rows of the whole text's windows, when it was read: little-endian f32.
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub windows: Option<Vec<u8>>,
    /// Informative tokens of title + description (null: no description).
    #[serde(default)]
    pub lead_evidence: Option<i32>,
    /// Whether the item had a transcript.
    pub has_body: bool,
    /// The item's own candidate labels, when it had them.
    #[serde(default)]
    pub candidate_labels: Option<Vec<String>>,
}

impl ItemEmbedding {
    /// The item's one vector for similarity: the mean of its whole-text window rows (of the
    /// lead's when only the lead was read), L2-normalised, as `Tagger::embed_document` pools a
    /// query text. `None` when there are no rows.
    pub fn pooled(&self) -> Result<Option<Vec<f32>>, String> {
        let dim = usize::try_from(self.dim).map_err(|_| format!("dim {} is negative", self.dim))?;
        let Some(bytes) = self.windows.as_deref().filter(|b| !b.is_empty()).or(self.lead.as_deref()) else { return Ok(None) };
        let rows = rows_from_bytes(bytes, dim)?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut acc = vec![0f32; dim];
        for r in &rows {
            acc.iter_mut().zip(r).for_each(|(a, x)| *a += x);
        }
        let norm = acc.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            acc.iter_mut().for_each(|x| *x /= norm);
        }
        Ok(Some(acc))
    }
}

/// Where a tagger finds what it read of an item before, by media id (the sink's
/// `media_embeddings`): an item ingested again with the same text is scored from it without the
/// model. Implemented by the store's crate; the tagger only calls it.
pub trait EmbeddingStore: Send + Sync + 'static {
    /// The stored embedding of `media_id`, `Ok(None)` when there is none. Errors are strings:
    /// the caller falls back to the model and counts them.
    fn stored<'a>(&'a self, media_id: &'a str) -> StoredEmbedding<'a>;
}

/// What [`EmbeddingStore::stored`] returns.
pub type StoredEmbedding<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<ItemEmbedding>, String>> + Send + 'a>>;

/// Rows of equal length as little-endian f32 bytes (the `bytes` of [`ItemEmbedding`]).
pub fn rows_to_bytes(rows: &[Vec<f32>]) -> Vec<u8> {
    rows.iter().flatten().flat_map(|x| x.to_le_bytes()).collect()
}

/// The rows of [`rows_to_bytes`] back, `dim` floats each.
pub fn rows_from_bytes(bytes: &[u8], dim: usize) -> Result<Vec<Vec<f32>>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if dim == 0 || !bytes.len().is_multiple_of(4 * dim) {
        return Err(format!("{} bytes are not rows of {dim} f32", bytes.len()));
    }
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(floats.chunks(dim).map(<[f32]>::to_vec).collect())
}

impl Event for MediaTagged {
    const AVSC: &'static str = MEDIA_TAGGED_AVSC;
    fn key(&self) -> &str {
        &self.media_id
    }
    fn schema() -> &'static Schema {
        event_schema!(MEDIA_TAGGED_AVSC)
    }
    fn ingested_at_ms(&self) -> Option<i64> {
        Some(self.ingested_at)
    }
}

/// The output type of a processor without an output topic (the sink): it has no values, so
/// such a processor cannot return an event by mistake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NoOutput {}

impl Event for NoOutput {
    const AVSC: &'static str = "\"null\"";
    fn key(&self) -> &str {
        match *self {}
    }
    fn schema() -> &'static Schema {
        event_schema!(Self::AVSC)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Conversion between events and Avro values through their schema (no registry involved).
pub mod avro {
    use super::Event;
    use apache_avro::types::Value;

    /// Serialize an event to an Avro value conforming to its schema.
    pub fn to_value<E: Event>(event: &E) -> Result<Value, apache_avro::Error> {
        apache_avro::to_value(event)?.resolve(E::schema())
    }

    /// Read an event from an Avro value decoded with any compatible writer schema: the value
    /// is first resolved against the reader schema (defaults filled, unknown fields dropped).
    pub fn from_value<E: Event>(value: Value) -> Result<E, apache_avro::Error> {
        let resolved = value.resolve(E::schema())?;
        apache_avro::from_value(&resolved)
    }

    /// Avro binary (no framing) of an event, for tests and tools.
    #[allow(deprecated)]
    pub fn to_datum<E: Event>(event: &E) -> Result<Vec<u8>, apache_avro::Error> {
        apache_avro::to_avro_datum(E::schema(), to_value(event)?)
    }
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use super::*;

    #[test]
    fn pooled_is_the_normalised_mean_of_the_text_rows_else_the_lead() {
        let e = |lead: Option<Vec<Vec<f32>>>, windows: Option<Vec<Vec<f32>>>| ItemEmbedding {
            embedding_version: "ev".into(),
            text_hash: "th".into(),
            dim: 2,
            lead: lead.as_deref().map(rows_to_bytes),
            windows: windows.as_deref().map(rows_to_bytes),
            lead_evidence: None,
            has_body: false,
            candidate_labels: None,
        };
        let p = e(Some(vec![vec![0.0, 1.0]]), Some(vec![vec![3.0, 0.0], vec![3.0, 8.0]])).pooled().unwrap().unwrap();
        assert!((p[0] - 0.6).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6, "mean (3, 4) normalised: {p:?}");
        assert_eq!(e(Some(vec![vec![0.0, 2.0]]), None).pooled().unwrap(), Some(vec![0.0, 1.0]), "only the lead was read");
        assert_eq!(e(None, None).pooled().unwrap(), None);
        let mut bad = e(None, Some(vec![vec![1.0, 2.0]]));
        bad.dim = 3;
        assert!(bad.pooled().is_err(), "rows that are not of dim floats");
    }

    #[test]
    fn kinds_parse_from_their_symbol() {
        for k in ["VIDEO", "EPISODE", "MOVIE", "CLIP", "TRAILER", "LIVE", "PODCAST", "ARTICLE", "ATTRACTION", "OTHER"] {
            assert_eq!(k.parse::<MediaKind>().unwrap().as_str(), k);
        }
        assert!("video".parse::<MediaKind>().is_err());
    }

    #[test]
    fn as_str_is_the_serde_and_avro_name() {
        for k in MediaKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str(), "{k:?}");
        }
        for st in [Strategy::Embedding, Strategy::Nli] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str(), "{st:?}");
        }
    }

    use apache_avro::{from_avro_datum, to_avro_datum, types::Value};

    pub(crate) fn sample_ingested() -> MediaIngested {
        MediaIngested {
            media_id: "m-1".into(),
            kind: MediaKind::Trailer,
            title: "Storm over the bay".into(),
            description: Some("A fishing town braces for a hurricane.".into()),
            transcript: None,
            language: Some("en".into()),
            source: "archive-ingest".into(),
            ingested_at: 1_700_000_000_123,
            attributes: HashMap::from([("season".into(), "2".into())]),
            candidate_labels: Some(vec!["weather".into(), "drama".into()]),
        }
    }

    fn sample_tagged() -> MediaTagged {
        MediaTagged {
            media_id: "m-1".into(),
            kind: MediaKind::Attraction,
            tags: vec![Tag { label: "sport".into(), score: 0.75 }, Tag { label: "tech".into(), score: 0.25 }],
            no_tags_reason: None,
            strategy: Strategy::Nli,
            model: ModelRef { name: "m".into(), version: "1".into() },
            ingested_at: 1,
            tagged_at: 2,
            lineage: Lineage { topic: "media.ingested".into(), partition: 3, offset: 42 },
            title: Some("Cup final".into()),
            source: Some("archive-ingest".into()),
            language: None,
            attributes: HashMap::from([("season".into(), "2".into())]),
            taxonomy_version: Some("tx-0123456789ab".into()),
            embedding: None,
        }
    }

    fn sample_embedding() -> ItemEmbedding {
        ItemEmbedding {
            embedding_version: "ev-0123456789abcdef".into(),
            text_hash: "th-00".into(),
            dim: 2,
            lead: None,
            windows: Some(rows_to_bytes(&[vec![0.5, -0.25], vec![1.0, 0.0]])),
            lead_evidence: Some(7),
            has_body: true,
            candidate_labels: None,
        }
    }

    #[test]
    fn rows_round_trip_through_bytes() {
        let rows = vec![vec![0.1f32, -2.5, 3.25], vec![f32::MIN_POSITIVE, 0.0, 1e-7]];
        assert_eq!(rows_from_bytes(&rows_to_bytes(&rows), 3).unwrap(), rows);
        assert!(rows_from_bytes(&[0u8; 10], 3).unwrap_err().contains("not rows of 3"));
        assert!(rows_from_bytes(&[], 3).unwrap().is_empty());
    }

    /// `MediaTagged` written before title/source/language/attributes/taxonomy_version were
    /// carried still reads,
    /// with the defaults (the BACKWARD evolution `topology apply` registers).
    #[test]
    fn media_tagged_reads_events_without_carried_fields() {
        let mut json: serde_json::Value = serde_json::from_str(MEDIA_TAGGED_AVSC).unwrap();
        let carried = ["title", "source", "language", "attributes", "taxonomy_version", "embedding"];
        json["fields"].as_array_mut().unwrap().retain(|f| !carried.contains(&f["name"].as_str().unwrap()));
        let old = Schema::parse(&json).unwrap();
        let e = MediaTagged { embedding: Some(sample_embedding()), ..sample_tagged() };
        let v = apache_avro::to_value(&e).unwrap();
        let apache_avro::types::Value::Record(fields) = v else { panic!("record") };
        let old_value = apache_avro::types::Value::Record(fields.into_iter().filter(|(k, _)| !carried.contains(&k.as_str())).collect());
        let bytes = to_avro_datum(&old, old_value.resolve(&old).unwrap()).unwrap();
        let read = from_avro_datum(&old, &mut bytes.as_slice(), Some(MediaTagged::schema())).unwrap();
        let back: MediaTagged = avro::from_value(read).unwrap();
        assert_eq!(back, MediaTagged { title: None, source: None, language: None, attributes: HashMap::new(), taxonomy_version: None, embedding: None, ..e });
    }

    fn round_trip<E: Event + PartialEq + std::fmt::Debug>(event: E) {
        let bytes = avro::to_datum(&event).expect("encode");
        let value = from_avro_datum(E::schema(), &mut bytes.as_slice(), None).expect("decode");
        let back: E = avro::from_value(value).expect("from value");
        assert_eq!(back, event);
    }

    #[test]
    fn media_ingested_matches_its_schema() {
        round_trip(sample_ingested());
        round_trip(MediaIngested { description: None, candidate_labels: None, attributes: HashMap::new(), ..sample_ingested() });
    }

    #[test]
    fn media_tagged_matches_its_schema() {
        round_trip(sample_tagged());
        round_trip(MediaTagged { tags: vec![], no_tags_reason: Some("empty_text".into()), ..sample_tagged() });
        round_trip(MediaTagged { embedding: Some(sample_embedding()), ..sample_tagged() });
        let lead_only =
            ItemEmbedding { lead: Some(rows_to_bytes(&[vec![1.0, 2.0]])), windows: None, lead_evidence: None, candidate_labels: Some(vec!["x".into()]), ..sample_embedding() };
        round_trip(MediaTagged { embedding: Some(lead_only), ..sample_tagged() });
    }

    /// Every schema field is present in the serialized Rust type and vice versa.
    #[test]
    fn rust_types_cover_every_schema_field() {
        fn fields(schema: &Schema) -> Vec<String> {
            match schema {
                Schema::Record(r) => r.fields.iter().map(|f| f.name.clone()).collect(),
                _ => panic!("not a record"),
            }
        }
        fn value_fields(v: Value) -> Vec<String> {
            match v {
                Value::Record(fs) => fs.into_iter().map(|(n, _)| n).collect(),
                _ => panic!("not a record"),
            }
        }
        let v = apache_avro::to_value(sample_ingested()).unwrap();
        assert_eq!(value_fields(v), fields(MediaIngested::schema()));
        let v = apache_avro::to_value(sample_tagged()).unwrap();
        assert_eq!(value_fields(v), fields(MediaTagged::schema()));
    }

    /// A writer that adds an optional field, and a reader that knows it, both keep working
    /// with old data and new data (BACKWARD and FORWARD in practice).
    #[test]
    fn evolution_adds_an_optional_field() {
        let mut json: serde_json::Value = serde_json::from_str(MEDIA_INGESTED_AVSC).unwrap();
        json["fields"].as_array_mut().unwrap().push(serde_json::json!(
            {"name": "rating", "type": ["null", "string"], "default": null}
        ));
        let v2 = Schema::parse_str(&json.to_string()).unwrap();
        let v1 = MediaIngested::schema();
        let compat = apache_avro::schema_compatibility::SchemaCompatibility::can_read(v1, &v2);
        assert!(compat.is_ok(), "new reader must read old data: {compat:?}");

        // New writer (v2 with the field set) -> old reader (v1 Rust type).
        let mut value = avro::to_value(&sample_ingested()).unwrap();
        if let Value::Record(fields) = &mut value {
            fields.push(("rating".into(), Value::Union(1, Box::new(Value::String("PG".into())))));
        }
        let bytes = to_avro_datum(&v2, value).unwrap();
        let decoded = from_avro_datum(&v2, &mut bytes.as_slice(), None).unwrap();
        let old: MediaIngested = avro::from_value(decoded).unwrap();
        assert_eq!(old, sample_ingested());

        // Old writer (v1) -> new reader (v2): the field takes its default.
        let bytes = avro::to_datum(&sample_ingested()).unwrap();
        let decoded = from_avro_datum(v1, &mut bytes.as_slice(), Some(&v2)).unwrap();
        match decoded {
            Value::Record(fields) => {
                let rating = fields.iter().find(|(n, _)| n == "rating").map(|(_, v)| v.clone());
                assert_eq!(rating, Some(Value::Union(0, Box::new(Value::Null))));
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }

    /// An enum symbol unknown to the reader decodes as the enum default.
    #[test]
    fn unknown_kind_falls_back_to_other() {
        let json = MEDIA_INGESTED_AVSC.replace("\"OTHER\"]", "\"OTHER\", \"SHORT\"]");
        let writer = Schema::parse_str(&json).unwrap();
        let mut value = avro::to_value(&sample_ingested()).unwrap();
        if let Value::Record(fields) = &mut value {
            fields[1].1 = Value::Enum(10, "SHORT".into());
        }
        let bytes = to_avro_datum(&writer, value).unwrap();
        let decoded = from_avro_datum(&writer, &mut bytes.as_slice(), Some(MediaIngested::schema())).unwrap();
        let item: MediaIngested = avro::from_value(decoded).unwrap();
        assert_eq!(item.kind, MediaKind::Other);
    }
}
