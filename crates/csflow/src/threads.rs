//! Process-wide thread settings: how many threads compute, and how candle's own workers wait.

use std::num::NonZeroUsize;

/// The variable that both rayon's global pool (csflow's kernels) and candle's elementwise pool read for their
/// size when they start.
const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// candle's variable for how many pause loops its elementwise workers spin before sleeping.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
/// Ours (candle's default: 25 000).
const SPIN_LIMIT: &str = "100";

/// Lets candle's elementwise workers sleep soon after each op, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set.
///
/// candle 0.11 runs elementwise ops of 64K elements or more on a pool of its own (one thread fewer than the
/// cores), whose threads spin some 25 000 pause loops waiting for the next op. On two cores the spinning
/// thread took a core from csflow's kernels: 15 % of a CPU-size training step's samples. With 100 loops
/// (Zen 5, 2 threads): CPU-size step 0.486 -> 0.427 s, CPU-size forward at batch 16 0.075 -> 0.071 s,
/// `predict` and the paper-size step unchanged. Call at the start of a binary, before any thread starts:
/// it sets an environment variable, which candle reads once.
pub fn settle_candle_workers() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT);
    }
}

/// Computes on `n` threads: csflow's kernels and candle's elementwise workers. Call at the start of a binary,
/// before any thread starts: both pools read `RAYON_NUM_THREADS` once, when they start.
pub fn set_threads(n: NonZeroUsize) {
    std::env::set_var(THREADS_VAR, n.to_string());
}

/// The threads csflow's kernels run on (starts rayon's global pool if it has not started yet).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
