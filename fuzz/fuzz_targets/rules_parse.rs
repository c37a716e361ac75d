//! Any text as a rules file: loaded (and its warnings computed) or
//! explained with problems, never a panic.
#![no_main]

use hookgate::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match RuleSet::parse(text) {
        Ok(rules) => {
            let _ = rules.warnings();
        }
        Err(problems) => assert!(!problems.is_empty()),
    }
});
