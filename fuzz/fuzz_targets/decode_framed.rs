//! The framed-Avro decode path of `Codec::decode` without the registry: `codec::frame_id` (the
//! Confluent framing: magic byte 0, 4-byte schema id), a writer schema chosen by that id from a
//! fixed set standing in for the registry (ours, an evolved one, a recursive one, a foreign one),
//! then `codec::decode_body::<MediaIngested>` — the depth check, `from_avro_datum(writer, body,
//! Some(reader))` and `events::avro::from_value` — exactly as `Codec::decode` runs after the
//! registry lookup. Any input must end in `Ok` or `Err`; a panic, abort, stack overflow or
//! runaway allocation is a bug.
#![no_main]

use std::sync::OnceLock;

use apache_avro::Schema;
use libfuzzer_sys::fuzz_target;
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

fuzz_target!(|bytes: &[u8]| {
    let Ok(id) = codec::frame_id(bytes) else {
        return;
    };
    let w = writers();
    let writer = &w[id as usize % w.len()];
    let _ = codec::decode_body::<MediaIngested>(writer, id, &bytes[5..]);
});
