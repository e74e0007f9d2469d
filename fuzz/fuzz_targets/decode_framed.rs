//! The framed-Avro decode path of `Codec::decode` without the registry: `codec::frame_id` (the
//! Confluent framing: magic byte 0, 4-byte schema id), a writer schema chosen by that id from a
//! fixed set standing in for the registry (ours, an evolved one, a recursive one, a foreign one),
//! then `codec::decode_body::<MediaIngested>` — the depth check, `from_avro_datum(writer, body,
//! Some(reader))` and `events::avro::from_value` — exactly as `Codec::decode` runs after the
//! registry lookup. Any input must end in `Ok` or `Err`; a panic, abort, stack overflow or
//! runaway allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../shared/decode_framed.rs");

fuzz_target!(|bytes: &[u8]| run_one(bytes));
