//! Keeping CPUs awake through a burst of requests, so that waking the caller and the serving
//! thread is cheap.
//!
//! Every request to a FUSE filesystem costs two thread wake-ups: the kernel wakes the serving
//! thread to read it, and the reply wakes the caller. When the CPU a thread sleeps on went idle
//! in between, the wake-up also waits for that CPU to leave its idle state. On a virtual
//! machine without guest halt polling (this one boots with `haltpoll.guest_halt_poll_ns=0`)
//! that is an exit to the hypervisor and back on both sides, tens of microseconds, more than
//! the work of the request. Measured here: `stat` on a mount with no attribute cache (three
//! requests) took 154 µs with idle CPUs and 58 µs with these pollers; an untar of 10,000
//! files took 1.3 s to 6 s, depending on whether other work kept the CPUs busy.
//!
//! This is the guest's halt polling, done for the mount's bursts: while requests keep coming,
//! [`POLLERS`] threads of the lowest priority (`SCHED_IDLE`) spin, so the CPUs they run on do
//! not halt. Any other thread that wakes on such a CPU takes it at once; the pollers use only
//! time that would have been idle. They stop [`IDLE_AFTER`] after the last request, so a mount
//! nobody uses costs nothing. `alkfs mount --no-poll` turns them off (a laptop on battery
//! may prefer slower requests to busy idle time).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long after the last request the pollers keep spinning.
pub const IDLE_AFTER: Duration = Duration::from_millis(1);
/// How many CPUs are kept awake: the caller's and the serving thread's.
pub const POLLERS: usize = 2;

/// The pollers of one mount.
pub struct Pollers {
    start: Instant,
    /// When the last request came, in microseconds since `start`.
    last_us: AtomicU64,
    polling: AtomicBool,
    stopped: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

impl Pollers {
    /// Starts the pollers, asleep until the first request.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let pollers = Arc::new(Pollers {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        });
        for _ in 0..POLLERS {
            let p = pollers.clone();
            std::thread::Builder::new().name("alkfs-poll".into()).spawn(move || p.run())?;
        }
        Ok(pollers)
    }

    /// Notes a request: the pollers spin (again) until [`IDLE_AFTER`] from now.
    pub fn request(&self) {
        self.last_us.store(self.now_us(), Ordering::Relaxed);
        if !self.polling.swap(true, Ordering::AcqRel) {
            self.notify();
        }
    }

    /// Ends the pollers.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify();
    }

    fn notify(&self) {
        let _guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.1.notify_all();
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn run(&self) {
        let lowest = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets this thread's scheduling policy; the parameter outlives the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &lowest) } != 0 {
            // At normal priority a spinning thread would take turns with real work: better
            // not to poll at all.
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower the mount's poll thread to SCHED_IDLE; not polling");
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
            // pollers again.
            self.polling.store(false, Ordering::Release);
        }
    }
}
