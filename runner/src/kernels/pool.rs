//! Where a forward pass runs: on as many of the pool's threads as the other programs on the
//! machine leave cores for.
//!
//! A forward pass waits at every matmul for its slowest thread, so a thread that the OS preempts
//! for another program holds up the whole pass until it is scheduled again. With one busy loop
//! beside 2 threads on 2 cores, generation kept 43–53 % of its idle speed; on 1 thread it kept
//! 55–84 % (amd-epyc-zen3-2c, `bench --busy-neighbour`). So each pass counts the cores that other
//! programs kept busy over the last [`WINDOW`] (from `/proc/stat`, less this process's own time)
//! and runs on the cores left, at least one, at most the pool's size. Outputs do not depend on it:
//! every kernel splits work into the same pieces whatever the thread count.
//!
//! Only on Linux, and only where this process may use every CPU of `/proc/stat` (in a container
//! limited to fewer, the machine-wide count says nothing about its own cores); elsewhere, and after
//! [`use_every_thread`], every pass runs on the whole pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// How long a measurement of the other programs' load spans.
const WINDOW: Duration = Duration::from_millis(250);

/// Whether passes may run on fewer threads than the pool has.
static ADAPT: AtomicBool = AtomicBool::new(true);

/// Runs `f` on a worker of rayon's global pool, or of a smaller pool when other programs keep
/// cores busy (the calling thread waits).
///
/// Callers that make many parallel calls in a row (a model's forward pass) should enter the pool
/// once: from inside, a parallel loop splits work with the other workers directly; from outside,
/// every loop hands its job to the pool and sleeps until it is done, a wake-up per matmul.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let most = rayon::current_num_threads();
    let threads = if ADAPT.load(Ordering::Relaxed) {
        free_cores().map_or(most, |free| free.clamp(1, most))
    } else {
        most
    };
    match smaller_pool(threads, most) {
        Some(pool) => pool.install(f),
        None => rayon::scope(|_| f()),
    }
}

/// Makes every later pass run on the whole pool, however busy the machine (`--fixed-threads`).
pub fn use_every_thread() {
    ADAPT.store(false, Ordering::Relaxed);
}

/// A pool of `threads` threads, built the first time it is asked for; None for the whole pool.
fn smaller_pool(threads: usize, most: usize) -> Option<&'static ThreadPool> {
    static POOLS: OnceLock<Vec<OnceLock<Option<ThreadPool>>>> = OnceLock::new();
    if threads >= most {
        return None;
    }
    let pools = POOLS.get_or_init(|| (0..most).map(|_| OnceLock::new()).collect());
    pools
        .get(threads)?
        .get_or_init(|| {
            ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("sanctum-{threads}-{i}"))
                .build()
                .ok()
        })
        .as_ref()
}

/// CPUs not kept busy by other programs over the last [`WINDOW`], rounded; None where that
/// cannot be told (asked again a window later).
fn free_cores() -> Option<usize> {
    static LAST: Mutex<Option<Measure>> = Mutex::new(None);
    let mut last = LAST.lock().ok()?;
    let now = Instant::now();
    match *last {
        Some(m) if now.duration_since(m.at) < WINDOW => m.free,
        previous => {
            let load = Load::read();
            let free = match (load, previous.and_then(|m| m.load)) {
                (Some(load), Some(before)) => Some(load.free_since(&before)),
                (Some(load), None) => Some(load.cpus),
                (None, _) => None,
            };
            *last = Some(Measure {
                at: now,
                load,
                free,
            });
            free
        }
    }
}

/// The last reading of [`Load`], and what it said.
#[derive(Debug, Clone, Copy)]
struct Measure {
    at: Instant,
    load: Option<Load>,
    free: Option<usize>,
}

/// Cumulative CPU time, in clock ticks: the machine's, and this process's.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Every CPU's time, busy or not.
    total: u64,
    /// Every CPU's time not idle (steal included: a vCPU the hypervisor gave away is as busy).
    busy: u64,
    /// This process's user and system time.
    ours: u64,
    /// CPUs in `/proc/stat`.
    cpus: usize,
}

impl Load {
    #[cfg(target_os = "linux")]
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ours = std::fs::read_to_string("/proc/self/stat").ok()?;
        let load = Self::parse(&stat, &ours)?;
        let allowed = std::thread::available_parallelism().ok()?.get();
        (load.cpus == allowed).then_some(load)
    }

    #[cfg(not(target_os = "linux"))]
    fn read() -> Option<Self> {
        None
    }

    /// From the texts of `/proc/stat` and `/proc/self/stat` (see proc(5)).
    fn parse(stat: &str, own: &str) -> Option<Self> {
        let mut lines = stat.lines();
        let times: Vec<u64> = lines
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
        let total: u64 = times.iter().take(8).sum();
        let idle = times.get(3)? + times.get(4)?;
        let cpus = lines
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        // The command name, in parentheses, may hold spaces: fields are counted after it.
        let after_name = &own[own.rfind(')')? + 1..];
        let mut fields = after_name.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(Self {
            total,
            busy: total.checked_sub(idle)?,
            ours: utime + stime,
            cpus,
        })
    }

    /// CPUs that others left free between `before` and now: all of them less the time other
    /// programs ran, as a share of the machine, rounded to whole cores.
    fn free_since(&self, before: &Self) -> usize {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return self.cpus;
        }
        let others = self
            .busy
            .saturating_sub(before.busy)
            .saturating_sub(self.ours.saturating_sub(before.ours));
        let busy_cores = (others as f64 / total as f64 * self.cpus as f64).round() as usize;
        self.cpus.saturating_sub(busy_cores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n\
                        cpu1 50 0 25 400 5 0 0 20 0 0\nintr 1 2 3\nctxt 9\n";

    fn own(utime: u64, stime: u64) -> String {
        format!("42 (a (weird) name) R 1 42 42 0 -1 4194304 10 0 0 0 {utime} {stime} 0 0 20 0 3 0")
    }

    #[test]
    fn reads_the_machines_and_its_own_time() {
        let load = Load::parse(STAT, &own(30, 5)).unwrap();
        assert_eq!(
            (load.total, load.busy, load.ours, load.cpus),
            (1000, 190, 35, 2)
        );
        assert!(Load::parse("intr 1\n", &own(1, 1)).is_none());
        assert!(Load::parse(STAT, "42 (truncated").is_none());
    }

    #[test]
    fn counts_cores_other_programs_keep_busy() {
        let before = Load {
            total: 1000,
            busy: 200,
            ours: 100,
            cpus: 2,
        };
        let after = |busy: u64, ours: u64| Load {
            total: 1200,
            busy: 200 + busy,
            ours: 100 + ours,
            cpus: 2,
        };
        // Idle but for this process on both cores.
        assert_eq!(after(200, 200).free_since(&before), 2);
        // A busy loop holding a third of the machine beside this process: one core taken.
        assert_eq!(after(200, 134).free_since(&before), 1);
        // Both cores busy with others: still at least one thread, by `on_pool`'s clamp.
        assert_eq!(after(200, 0).free_since(&before), 0);
        // A little background work rounds away.
        assert_eq!(after(140, 110).free_since(&before), 2);
        // No time passed.
        assert_eq!(before.free_since(&before), 2);
    }
}
