//! # streamoasis-testkit
//!
//! What the test suites share (a dev-dependency only):
//! - [`root`], [`models`]: the repository and its exported models.
//! - [`absolute_directions`]: a topology copied elsewhere keeps finding its calibration files.
//! - [`stack_tests`] / [`require_stack!`]: the two test tiers. A plain `cargo test` runs the unit
//!   tests and everything that needs no service; a test that needs the local stack (Kafka, the
//!   CQL database, the schema registry) starts with `require_stack!()`, which returns early with
//!   a `skip` line unless `STREAMOASIS_STACK_TESTS=1`. `scripts/test` sets it after
//!   `scripts/stack up`, so under the test command such a test runs and fails when a service is
//!   missing: it cannot skip.

use std::path::{Path, PathBuf};

/// The variable that turns on the tests needing the local stack.
pub const STACK_TESTS: &str = "STREAMOASIS_STACK_TESTS";

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The exported models (`STREAMOASIS_MODELS`, else `models/` at the root, which `scripts/setup`
/// fills).
pub fn models() -> PathBuf {
    std::env::var_os("STREAMOASIS_MODELS").map(PathBuf::from).unwrap_or_else(|| root().join("models"))
}

/// Make every calibration's `directions` path of a `tagging:` section absolute (against the
/// repository root), for a copy of topology.yaml written to another folder or read without
/// its file: relative paths resolve against the topology's folder.
pub fn absolute_directions(tagging: &mut serde_yaml::Value) {
    let fix = |c: &mut serde_yaml::Value| {
        if let Some(p) = c.get("directions").and_then(|p| p.as_str()).map(str::to_string) {
            if !Path::new(&p).is_absolute() {
                c["directions"] = root().join(p).display().to_string().into();
            }
        }
    };
    let e = &mut tagging["embedding"];
    if let Some(c) = e.get_mut("calibration") {
        fix(c);
    }
    if let Some(kinds) = e.get_mut("kinds").and_then(|k| k.as_mapping_mut()) {
        for (_, k) in kinds.iter_mut() {
            if let Some(c) = k.get_mut("calibration") {
                fix(c);
            }
        }
    }
}

/// Whether the stack tests run: true when `STREAMOASIS_STACK_TESTS=1`; otherwise prints a skip
/// line naming `test` and returns false. Any other value is a mistake and panics.
pub fn stack_tests(test: &str) -> bool {
    match std::env::var(STACK_TESTS).as_deref() {
        Ok("1") => true,
        Ok("") | Ok("0") | Err(_) => {
            eprintln!("skip {test}: needs the local stack (run `scripts/stack up`, source .cache/stack/env and set {STACK_TESTS}=1; scripts/test does)");
            false
        }
        Ok(other) => panic!("{STACK_TESTS}='{other}': set it to 1 (run the stack tests) or leave it unset"),
    }
}

/// Return early from a test that needs the local stack unless [`stack_tests`] says it runs.
#[macro_export]
macro_rules! require_stack {
    () => {
        if !$crate::stack_tests(module_path!()) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_holds_the_topology() {
        assert!(super::root().join("topology.yaml").is_file());
    }
}
