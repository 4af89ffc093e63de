//! Keeping a CPU awake through a burst of requests, so that waking the caller and the serving
//! thread is cheap.
//!
//! Every request to a FUSE filesystem costs two thread wake-ups: the kernel wakes the serving
//! thread to read it, and the reply wakes the caller. When the CPU a thread sleeps on went idle
//! in between, the wake-up also waits for that CPU to leave its idle state. On a virtual
//! machine without guest halt polling (this one boots with `haltpoll.guest_halt_poll_ns=0`)
//! that is an exit to the hypervisor and back, tens of microseconds, more than the work of
//! the request. And the scheduler, which places a woken thread on an idle CPU when there is
//! one, keeps the caller and the serving thread apart, so every request pays it twice.
//!
//! So while requests keep coming, one thread of the lowest weight (nice 19) spins. A CPU it
//! occupies is not idle, so the scheduler wakes the caller and the serving thread side by
//! side, where handing the CPU over is cheap; any other thread that wants the CPU gets it
//! all but 1.5 % (the weight of nice 19 against nice 0). It stops [`IDLE_AFTER`] after the
//! last request: a mount nobody uses costs nothing. Measured here, `stat` on a mount with no
//! attribute cache (three requests) took 154 µs without it and 35 µs with it; an untar of
//! 10,000 files 1.3–6 s without it, depending on what else kept the CPUs busy, and 1.5–1.9 s
//! with it. A `SCHED_IDLE` thread (weight 3, and counted as idle when the scheduler places
//! threads) gained less: 70 µs and 1.6–2.5 s. `alkfs mount --no-poll` turns it off (a laptop
//! on battery may prefer slower requests to a busy CPU).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long after the last request the poller keeps spinning.
pub const IDLE_AFTER: Duration = Duration::from_millis(1);
/// The poller's nice value: the lowest weight a normal thread can have.
pub const POLLER_NICE: i32 = 19;

/// The poller of one mount.
pub struct Poller {
    start: Instant,
    /// When the last request came, in microseconds since `start`.
    last_us: AtomicU64,
    polling: AtomicBool,
    stopped: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

impl Poller {
    /// Starts the poller, asleep until the first request.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let poller = Arc::new(Poller {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        });
        let p = poller.clone();
        std::thread::Builder::new().name("alkfs-poll".into()).spawn(move || p.run())?;
        Ok(poller)
    }

    /// Notes a request: the poller spins (again) until [`IDLE_AFTER`] from now.
    pub fn request(&self) {
        self.last_us.store(self.now_us(), Ordering::Relaxed);
        // The load first: within a burst (nearly every request) no read-modify-write.
        if !self.polling.load(Ordering::Acquire) && !self.polling.swap(true, Ordering::AcqRel) {
            self.notify();
        }
    }

    /// Ends the poller.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify();
    }

    fn notify(&self) {
        let _guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.1.notify_one();
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn run(&self) {
        // SAFETY: sets this thread's nice value (Linux: per thread); no memory is passed.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, POLLER_NICE) } != 0 {
            // At normal weight a spinning thread would take turns with real work: better not
            // to poll at all.
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower the mount's poll thread to nice 19; not polling");
            return;
        }
        loop {
            {
                let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                let _guard = self
                    .wake
                    .1
                    .wait_while(guard, |_| !self.polling.load(Ordering::Acquire) && !self.stopped.load(Ordering::Acquire))
                    .unwrap_or_else(|e| e.into_inner());
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            while self.now_us().saturating_sub(self.last_us.load(Ordering::Relaxed)) < IDLE_AFTER.as_micros() as u64 {
                if self.stopped.load(Ordering::Acquire) {
                    return;
                }
                std::hint::spin_loop();
            }
            // A request noted after the check above finds `polling` false and wakes the
            // poller again.
            self.polling.store(false, Ordering::Release);
        }
    }
}
