// The body of the `topology` fuzz target, shared with its regression replay
// (processors/pipeline/tests/fuzz_regressions.rs): included, not a module, so both build it alike.
use std::path::Path;

use streamoasis_pipeline::topology::Topology;

/// One input, exactly as the fuzz target runs it.
pub fn run_one(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(t) = Topology::parse(text, Path::new("fuzz/topology.yaml")) {
            // What the processors read right after parsing.
            for s in &t.file.schemas {
                let _ = t.resolve(&s.file);
            }
            let _ = t.topic(&t.file.processors.tagger.input);
        }
    }
}
