//! Any bytes as a job: parsed or refused, never a panic.
#![no_main]

use hookgate::webhook::job::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(job) = Job::from_bytes(body) {
        let _ = job.max_risk();
        let _ = job.value();
    }
});
