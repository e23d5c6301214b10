//! The tokio runtime each binary runs on, sized by `[runtime] threads`.
//!
//! The tunnel's work per request is a chain of small hand-offs: a TCP
//! task, a QUIC stream, the connection's driver and the UDP socket. On a
//! multi-threaded runtime each hand-off can wake another worker thread,
//! and on a small machine those wakeups cost more than the second core
//! gives: with two cores, one thread spent about 40% less CPU per
//! keep-alive request and served more requests per second
//! (docs/benchmarks.md, issue 16). So `auto` runs one thread on machines
//! with at most two CPUs and one per CPU above that. The count is always
//! set here, so tokio's `TOKIO_WORKER_THREADS` has no effect.

use std::io;

/// `[runtime]`: how many threads run the async work (TLS, QUIC, DNS, API).
/// SQLite and other blocking calls run on tokio's separate blocking pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads: 0 (auto) is one on machines with at most two CPUs
    /// and one per CPU above that; 1 runs everything on one thread.
    pub threads: usize,
}

/// Most worker threads accepted.
pub const MAX_THREADS: usize = 1024;

impl RuntimeConfig {
    /// Checks the value, naming the field.
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if self.threads > MAX_THREADS {
            return Err(format!("{prefix}.threads = {} must be at most {MAX_THREADS} (0 = auto)", self.threads));
        }
        Ok(())
    }

    /// The number of worker threads on a machine with `cpus` CPUs.
    pub fn worker_threads(&self, cpus: usize) -> usize {
        match self.threads {
            0 if cpus <= 2 => 1,
            0 => cpus,
            n => n,
        }
    }

    /// Builds the runtime: a current-thread runtime for one thread (no
    /// cross-thread wakeups at all), a multi-threaded one otherwise.
    pub fn build(&self) -> io::Result<tokio::runtime::Runtime> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = self.worker_threads(cpus);
        tracing::info!(threads, cpus, "runtime threads");
        if threads == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_one_thread_up_to_two_cpus_then_one_per_cpu() {
        let auto = RuntimeConfig::default();
        assert_eq!(auto.worker_threads(1), 1);
        assert_eq!(auto.worker_threads(2), 1);
        assert_eq!(auto.worker_threads(3), 3);
        assert_eq!(auto.worker_threads(16), 16);
        assert_eq!(RuntimeConfig { threads: 4 }.worker_threads(2), 4);
        assert_eq!(RuntimeConfig { threads: 1 }.worker_threads(64), 1);
    }

    #[test]
    fn too_many_threads_name_the_field() {
        assert!(RuntimeConfig { threads: MAX_THREADS }.validate("runtime").is_ok());
        let err = RuntimeConfig { threads: MAX_THREADS + 1 }.validate("runtime").unwrap_err();
        assert!(err.starts_with("runtime.threads = 1025"), "{err}");
    }

    #[test]
    fn one_thread_builds_a_runtime_that_runs_tasks() {
        let runtime = RuntimeConfig { threads: 1 }.build().unwrap();
        assert_eq!(runtime.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }), 7);
        let runtime = RuntimeConfig { threads: 2 }.build().unwrap();
        assert_eq!(runtime.block_on(async { tokio::spawn(async { 8 }).await.unwrap() }), 8);
    }
}
