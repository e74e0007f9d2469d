// The body of the `decode_framed` fuzz target, shared with its regression replay
// (processors/pipeline/tests/fuzz_regressions.rs): included, not a module, so both build it alike.
use std::sync::OnceLock;

use apache_avro::Schema;
use streamoasis_pipeline::codec;
use streamoasis_pipeline::events::{Event, MediaIngested};

/// Writer schemas by id (id modulo the count): what a registry could hand back.
fn writers() -> &'static [Schema] {
    static W: OnceLock<Vec<Schema>> = OnceLock::new();
    W.get_or_init(|| {
        let ours = MediaIngested::AVSC;
        // An evolved writer: one field more (with a default), `language` dropped.
        let evolved = ours.replacen(
            r#"{"name": "language""#,
            r#"{"name": "rating", "type": ["null", "int"], "default": null, "doc": "x"}, {"name": "language_old""#,
            1,
        );
        // Named like ours, plus a recursive union: the shape that nests without bound.
        let recursive = ours.replacen(
            r#""fields": ["#,
            r#""fields": [{"name": "nest", "type": ["null", {"type": "record", "name": "Nest", "fields": [{"name": "next", "type": ["null", "Nest"]}, {"name": "items", "type": {"type": "array", "items": "Nest"}}]}], "default": null},"#,
            1,
        );
        let foreign = r#"{"type": "record", "name": "Other", "namespace": "x", "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": {"type": "map", "values": "bytes"}}]}"#;
        [ours.to_string(), evolved, recursive, foreign.to_string()]
            .iter()
            .map(|s| Schema::parse_str(s).expect("fuzz writer schema parses"))
            .collect()
    })
}

/// One input, exactly as the fuzz target runs it.
pub fn run_one(bytes: &[u8]) {
    let Ok(id) = codec::frame_id(bytes) else {
        return;
    };
    let w = writers();
    let writer = &w[id as usize % w.len()];
    let _ = codec::decode_body::<MediaIngested>(writer, id, &bytes[5..]);
}
