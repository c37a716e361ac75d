//! Any bytes as a job: parsed or refused, never a panic.
#![no_main]

use hookgate::webhook::job::Job;
use hookgate::webhook::verify::Verifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    // No secret configured: every body is taken as verified.
    let Ok(verified) = Verifier::new(Vec::new()).verify(body.to_vec().into(), None) else {
        return;
    };
    if let Ok(job) = Job::parse(&verified) {
        let _ = job.max_risk();
        let _ = job.value();
    }
});
