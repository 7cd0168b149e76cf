//! Helpers shared by the runner's unit tests and the workspace's benches; not part of the API.

/// One step of the 64-bit LCG behind [`values`].
pub fn lcg_step(state: u64) -> u64 {
    state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
}

/// Deterministic pseudo-random values in `[-scale, scale)` from a 64-bit LCG seeded with `state`:
/// weights and activations for tests and benches that need no model.
pub fn values(n: usize, mut state: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            state = lcg_step(state);
            (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Tells the terminal that the running test skipped `what`, past the test harness's capture of
/// `eprintln!` (which hides a passing test's output): a skip must never read as a pass.
pub fn skip(what: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {what}");
}
