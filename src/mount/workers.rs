//! Threads for requests that may wait: the FUSE loop hands such a request (with its reply)
//! to them and goes on with the next one. One loop thread serves everything else in the
//! order the kernel sent it (measured: serving every request on several threads, each with
//! its own clone of the FUSE device, made an untar of 10,000 files about twice as slow
//! here, the threads taking turns waking on two CPUs); only a read of bytes still on a peer,
//! an open that must fetch them first, and changes that wait for the node (rename, unlink,
//! symlink, fsync) come here, so one of them holds up its caller, not the mount.

use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;

/// Threads serving requests that may wait.
pub const WORKERS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// The pool: jobs run in the order they came, [`WORKERS`] at a time.
pub struct Workers {
    jobs: Mutex<Sender<Job>>,
}

impl Workers {
    /// Starts the threads (they end when the pool is dropped and the jobs are done).
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("alkfs-wait-{i}")).spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                job();
            })?;
        }
        Ok(Workers { jobs: Mutex::new(tx) })
    }

    /// Runs `job` on a worker (at once on this thread if they are gone: never dropped).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let sent = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(Box::new(job));
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }
}
