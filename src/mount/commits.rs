//! Write-behind of closed files: a close hands its staged file to this queue and returns;
//! one thread sends what is queued to the node in batches (one request, one transaction per
//! batch) as fast as the node commits them.
//!
//! Why: a close that waited for its own commit costs a round trip to the node and a SQLite
//! transaction per file, which bounds `tar x` or `cp -r` of many small files at about a
//! thousand files a second. Queued, they go a few hundred per transaction while the next
//! files are written.
//!
//! What a user sees: the mount shows a closed file's new bytes at once (the filesystem
//! layer reads queued files from their staging file); other processes (the CLI, a peer)
//! see it when its batch commits, milliseconds later. Operations that build on the
//! committed state (rename, unlink, reopening the file to change it, fsync) first wait for
//! the queue to empty ([`Committer::drain`]). A batch the node cannot take (it is down or
//! restarting) stays queued and is retried, so a close is never dropped while the mount
//! runs.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::path::TreePath;

use crate::control::client::Client;
use crate::control::{Request, StagedFile, WireScope};

/// Most files sent in one request (one transaction).
const BATCH_FILES_MAX: usize = 512;
/// Pause before resending a batch the node did not take.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where a closed file's bytes are until the node has them.
#[derive(Clone, Debug)]
pub enum ClosedBytes {
    /// Small content, sent in the request.
    Memory(Arc<Vec<u8>>),
    /// A staging file the node takes over.
    File(PathBuf),
}

/// A closed file waiting to be committed.
#[derive(Clone, Debug)]
pub struct Closed {
    /// The inode it was written through (to match amendments).
    pub ino: u64,
    /// Where it goes.
    pub path: TreePath,
    /// Its bytes.
    pub bytes: ClosedBytes,
    /// Its length.
    pub size: u64,
    /// Its hash, when the session could hash it as it was written.
    pub hash: Option<ContentHash>,
    /// Permission bits.
    pub mode: u32,
    /// Modification time.
    pub mtime_ms: i64,
}

struct Queue {
    waiting: VecDeque<(u64, Closed)>,
    /// Tickets handed out so far (the last one).
    issued: u64,
    /// Every ticket up to this one is committed (or refused for good).
    done: u64,
    /// Every ticket up to this one is in the batch being sent: too late to amend.
    sent: u64,
    /// Set when the mount ends.
    stop: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    changed: Condvar,
    node: Client,
    scope: WireScope,
}

/// The write-behind queue and its sending thread.
pub struct Committer {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the sending thread; it commits on `node` into `scope`.
    pub fn start(node: Client, scope: WireScope) -> Self {
        let inner = Arc::new(Inner { queue: Mutex::new(Queue { waiting: VecDeque::new(), issued: 0, done: 0, sent: 0, stop: false }), changed: Condvar::new(), node, scope });
        let worker = inner.clone();
        let thread = std::thread::Builder::new().name("alkfs-commits".into()).spawn(move || worker.run()).expect("spawn the commit thread");
        Committer { inner, thread: Some(thread) }
    }

    /// Queues `file`; returns its ticket (see [`is_done`](Self::is_done)).
    pub fn push(&self, file: Closed) -> u64 {
        let mut q = self.inner.lock();
        q.issued += 1;
        let ticket = q.issued;
        q.waiting.push_back((ticket, file));
        self.inner.changed.notify_all();
        ticket
    }

    /// Whether ticket `t` is committed (or was refused for good).
    pub fn is_done(&self, t: u64) -> bool {
        self.inner.lock().done >= t
    }

    /// Changes the mode or mtime of inode `ino`'s file while it still waits (`chmod` or
    /// `utimes` right after close, as `tar` and `cp -p` do); false once it was sent.
    pub fn amend(&self, ino: u64, mode: Option<u32>, mtime_ms: Option<i64>) -> bool {
        let mut q = self.inner.lock();
        let sent = q.sent;
        let Some((_, f)) = q.waiting.iter_mut().rev().find(|(t, f)| f.ino == ino && *t > sent) else { return false };
        if let Some(m) = mode {
            f.mode = m;
        }
        if let Some(ms) = mtime_ms {
            f.mtime_ms = ms;
        }
        true
    }

    /// Waits until everything queued so far is committed, at most `timeout`; false when
    /// some of it is still waiting then (the node is down or slow).
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.inner.lock();
        let target = q.issued;
        while q.done < target && !q.stop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Waits up to `timeout` for the queue to empty; returns what is still waiting.
    pub fn finish(mut self, timeout: Duration) -> Vec<Closed> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.inner.lock();
        while q.done < q.issued {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        q.stop = true;
        let rest = q.waiting.drain(..).map(|(_, f)| f).collect();
        drop(q);
        self.inner.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        rest
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let batch: Vec<(u64, Closed)> = {
                let mut q = self.lock();
                while q.waiting.is_empty() && !q.stop {
                    q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.stop {
                    return;
                }
                let n = q.waiting.len().min(BATCH_FILES_MAX);
                let batch: Vec<(u64, Closed)> = q.waiting.iter().take(n).cloned().collect();
                // From here on these go as they are: an amendment now would be lost.
                q.sent = batch.last().map(|(t, _)| *t).unwrap_or(q.sent);
                batch
            };
            let last = batch.last().map(|(t, _)| *t).unwrap_or(0);
            match self.send(&batch) {
                Ok(()) => {
                    let mut q = self.lock();
                    q.waiting.retain(|(t, _)| *t > last);
                    q.done = q.done.max(last);
                    self.changed.notify_all();
                }
                Err(e) if e.retry => {
                    tracing::warn!(files = batch.len(), error = %e.message, "the node did not take closed files; retrying (they stay visible in the mount)");
                    let mut q = self.lock();
                    q.sent = q.done; // not sent after all: amendable until the next try
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(e) => {
                    // Refused for what they are (not for the node being away): send them one
                    // by one so one bad file does not hold the others back.
                    for (t, f) in &batch {
                        if let Err(e1) = self.send(std::slice::from_ref(&(*t, f.clone()))) {
                            if e1.retry {
                                break;
                            }
                            tracing::error!(path = %f.path, error = %e1.message, "a closed file could not be committed; its old version stays");
                            if let ClosedBytes::File(p) = &f.bytes {
                                let _ = std::fs::remove_file(p);
                            }
                        }
                        let mut q = self.lock();
                        q.waiting.retain(|(tt, _)| tt != t);
                        q.done = q.done.max(*t);
                        self.changed.notify_all();
                    }
                    tracing::debug!(error = %e.message, "batch refused");
                }
            }
        }
    }

    fn send(&self, batch: &[(u64, Closed)]) -> Result<(), SendError> {
        let items = batch
            .iter()
            .map(|(_, f)| {
                let (staging, data) = match &f.bytes {
                    ClosedBytes::Memory(d) => (None, Some(data_encoding::BASE64.encode(d))),
                    ClosedBytes::File(p) => (Some(p.clone()), None),
                };
                StagedFile { path: f.path.to_string(), staging, data, hash: f.hash.map(|h| h.to_hex()), size: Some(f.size), mode: f.mode, mtime_ms: f.mtime_ms }
            })
            .collect();
        match self.node.call(&Request::PutStaged { scope: self.scope.clone(), items }) {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = format!("{e:#}");
                // The node refused the request itself (it answered): retrying the same batch
                // would fail the same way. No answer (a connection error): it may come back.
                let answered = e.downcast_ref::<crate::control::client::Refused>().is_some();
                Err(SendError { retry: !answered, message })
            }
        }
    }
}

struct SendError {
    retry: bool,
    message: String,
}
