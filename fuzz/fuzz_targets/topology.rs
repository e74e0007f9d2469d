//! `Topology::parse`: any text must give a topology or a `ConfigError`, never a panic, abort or
//! stack overflow (YAML aliases, deep nesting, odd numbers and durations included).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../shared/topology.rs");

fuzz_target!(|bytes: &[u8]| run_one(bytes));
