//! `Topology::parse`: any text must give a topology or a `ConfigError`, never a panic, abort or
//! stack overflow (YAML aliases, deep nesting, odd numbers and durations included).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamoasis_pipeline::topology::Topology;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(t) = Topology::parse(text, Path::new("fuzz/topology.yaml")) {
            // What the processors read right after parsing.
            for s in &t.file.schemas {
                let _ = t.resolve(&s.file);
            }
            let _ = t.topic(&t.file.processors.tagger.input);
        }
    }
});
