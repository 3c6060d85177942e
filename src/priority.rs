//! The agent's bulk work (rendering pages in the extraction workers, running the model) yields
//! the CPU to everything else on the machine, at [`BULK_NICE_STEP`] below the agent's own
//! priority. A background indexer should not slow the programs its user is working in, and on
//! a few cores it must not slow a local Chroma either: the pipeline's pace is set by how fast
//! Chroma takes the records, and every moment Chroma waits for a core that rendering or the
//! model holds is lost, while rendering and the model have pages in hand and can wait
//! (BENCHMARKS.md, end to end). Where nothing else wants the CPU, the bulk work gets all of it.
//!
//! The sync stage, the watcher, the status API and search keep the agent's priority (the search
//! page's thumbnails are rendered by the same extraction workers, so they are lowered too).

use std::io;

/// How many nice steps below the agent its bulk work runs (19, the lowest, is the floor).
pub const BULK_NICE_STEP: i32 = 10;

/// The lowest priority a thread or process can have.
const NICE_FLOOR: i32 = 19;

/// Lowers the calling thread by [`BULK_NICE_STEP`]. On Linux nice is per thread, and threads
/// this one starts later inherit it. Elsewhere nice is per process, so this does nothing there
/// (macOS would need a QoS class; not done).
pub fn lower_this_thread() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let lower = (this_thread_nice()? + BULK_NICE_STEP).min(NICE_FLOOR);
        // SAFETY: gettid and setpriority take and return plain integers.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, lower) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
pub fn this_thread_nice() -> io::Result<i32> {
    // SAFETY: gettid and getpriority take and return plain integers; errno is this thread's.
    unsafe {
        // -1 is a valid priority, so errno says whether getpriority failed.
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(nice)
    }
}

/// A rayon pool for bulk work whose threads run at [`BULK_NICE_STEP`] below the caller.
/// Work run with `pool.install(..)` runs on it, and so do the parallel loops inside that work
/// (the model's matrix products), since rayon runs nested parallel work on the current pool.
/// Its size is rayon's default (`RAYON_NUM_THREADS`, which `main` sets to candle's count).
pub fn bulk_pool(name: &'static str) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |i| {
            if let Err(e) = lower_this_thread() {
                tracing::warn!("{name} thread {i}: could not lower its priority: {e}");
            }
        })
        .build()
}

/// For a child process (an extraction worker), between fork and exec: lowers it by
/// [`BULK_NICE_STEP`]. Async-signal-safe; a failure leaves the child at the agent's priority,
/// which is harmless.
#[cfg(unix)]
pub fn lower_child_before_exec() {
    // SAFETY: nice(2) is async-signal-safe and takes a plain integer.
    unsafe {
        libc::nice(BULK_NICE_STEP);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_bulk_pool_and_the_threads_it_starts_run_below_the_caller() {
        let ours = this_thread_nice().unwrap();
        let expected = (ours + BULK_NICE_STEP).min(NICE_FLOOR);
        let pool = bulk_pool("test-bulk").unwrap();
        let (in_pool, names, started) = pool.install(|| {
            let names = rayon::broadcast(|_| {
                (
                    std::thread::current().name().map(str::to_owned),
                    this_thread_nice().unwrap(),
                )
            });
            let started = std::thread::spawn(|| this_thread_nice().unwrap())
                .join()
                .unwrap();
            (this_thread_nice().unwrap(), names, started)
        });
        assert_eq!(in_pool, expected);
        assert_eq!(
            started, expected,
            "a thread started from the pool inherits it"
        );
        for (name, nice) in names {
            assert!(name.unwrap().starts_with("test-bulk-"));
            assert_eq!(nice, expected);
        }
        assert_eq!(
            this_thread_nice().unwrap(),
            ours,
            "the caller keeps its priority"
        );
    }
}
