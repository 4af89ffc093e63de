//! Write-behind of closed files: a close hands its staged file to this queue and returns;
//! one thread sends what is queued to the node in batches (one request, one transaction per
//! batch) as fast as the node commits them.
//!
//! Why: a close that waited for its own commit costs a round trip to the node and a SQLite
//! transaction per file, which bounds `tar x` or `cp -r` of many small files at about a
//! thousand files a second. Queued, they go tens per transaction (at most 64) while the next
//! files are written.
//!
//! New directories (mkdir) and directory mode and mtime changes (tar sets them after filling
//! a directory) queue the same way: a batch commits its directories first, then its files,
//! then its attribute changes.
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
use crate::control::{Request, StagedAttr, StagedDir, StagedFile, WireScope};

/// Most files sent in one request (one transaction).
const BATCH_FILES_MAX: usize = 64;
/// How long the first close of a batch waits for more before the batch goes, within a burst
/// of changes and unless someone waits for the queue ([`Committer::drain`]). Why: a
/// transaction costs the node about half a millisecond whatever its size, about as long as
/// `tar` takes to write the next small file, so batches sent at once stayed one or two files
/// long and the node spent a core on commits. Waiting this long lets a batch gather what
/// arrives meanwhile (tens of files), and delays what other processes see of a close by at
/// most this much.
const LINGER: Duration = Duration::from_millis(10);
/// A change that comes this long after the last batch went is not part of a burst: it goes
/// at once, without lingering. An editor's save is then committed (and seen by other
/// processes) about a millisecond after its close instead of ten, and the time in which a
/// killed mount would lose it is as short.
const QUIET_AFTER: Duration = Duration::from_millis(50);
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

/// A change of a directory's mode or mtime waiting to be committed (tar and `cp -a` set
/// them after filling the directory): queued like a close, so it costs no round trip.
#[derive(Clone, Debug)]
pub struct DirAttr {
    /// The directory.
    pub path: TreePath,
    /// New permission bits.
    pub mode: Option<u32>,
    /// New modification time.
    pub mtime_ms: Option<i64>,
}

/// A directory made on the mount, waiting to be committed (queued like a close: `tar x` and
/// `cp -r` make one per source directory, and a round trip each held them up).
#[derive(Clone, Debug)]
pub struct DirMade {
    /// Where.
    pub path: TreePath,
    /// Permission bits.
    pub mode: u32,
    /// When.
    pub mtime_ms: i64,
}

/// What the queue holds.
#[derive(Clone, Debug)]
enum Change {
    Close(Closed),
    DirAttr(DirAttr),
    Mkdir(DirMade),
}

struct Queue {
    waiting: VecDeque<(u64, Change)>,
    /// Tickets handed out so far (the last one).
    issued: u64,
    /// Every ticket up to this one is committed (or refused for good).
    done: u64,
    /// Every ticket up to this one is in the batch being sent: too late to amend.
    sent: u64,
    /// Callers of [`Committer::drain`] waiting now: the batch goes without lingering.
    draining: usize,
    /// When the last batch went (None: none yet).
    last_sent_at: Option<std::time::Instant>,
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
        let inner = Arc::new(Inner { queue: Mutex::new(Queue { waiting: VecDeque::new(), issued: 0, done: 0, sent: 0, draining: 0, last_sent_at: None, stop: false }), changed: Condvar::new(), node, scope });
        let worker = inner.clone();
        let thread = std::thread::Builder::new().name("alkfs-commits".into()).spawn(move || worker.run()).expect("spawn the commit thread");
        Committer { inner, thread: Some(thread) }
    }

    /// Queues `file`; returns its ticket (see [`is_done`](Self::is_done)).
    pub fn push(&self, file: Closed) -> u64 {
        self.inner.push(Change::Close(file))
    }

    /// Queues a new directory; returns its ticket.
    pub fn push_mkdir(&self, dir: DirMade) -> u64 {
        self.inner.push(Change::Mkdir(dir))
    }

    /// Queues a directory's new mode and/or mtime; a change of the same directory still
    /// waiting takes it instead. Returns the ticket that commits it.
    pub fn push_dir_attr(&self, attr: DirAttr) -> u64 {
        {
            let mut q = self.inner.lock();
            let sent = q.sent;
            let same = q.waiting.iter_mut().rev().find(|(t, c)| *t > sent && matches!(c, Change::DirAttr(d) if d.path == attr.path));
            if let Some((t, Change::DirAttr(d))) = same {
                d.mode = attr.mode.or(d.mode);
                d.mtime_ms = attr.mtime_ms.or(d.mtime_ms);
                return *t;
            }
        }
        self.inner.push(Change::DirAttr(attr))
    }

    /// Whether ticket `t` is committed (or was refused for good).
    pub fn is_done(&self, t: u64) -> bool {
        self.done_upto() >= t
    }

    /// Every ticket up to this one is committed (or was refused for good).
    pub fn done_upto(&self) -> u64 {
        self.inner.lock().done
    }

    /// Changes the mode or mtime of inode `ino`'s file while it still waits (`chmod` or
    /// `utimes` right after close, as `tar` and `cp -p` do); false once it was sent.
    pub fn amend(&self, ino: u64, mode: Option<u32>, mtime_ms: Option<i64>) -> bool {
        let mut q = self.inner.lock();
        let sent = q.sent;
        let found = q.waiting.iter_mut().rev().find(|(t, c)| *t > sent && matches!(c, Change::Close(f) if f.ino == ino));
        let Some((_, Change::Close(f))) = found else { return false };
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
        q.draining += 1;
        self.inner.changed.notify_all();
        let mut drained = true;
        while q.done < target && !q.stop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drained = false;
                break;
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        q.draining -= 1;
        drained
    }

    /// Waits up to `timeout` for the queue to empty; returns what is still waiting.
    pub fn finish(mut self, timeout: Duration) -> Vec<Closed> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.inner.lock();
        q.draining += 1;
        self.inner.changed.notify_all();
        while q.done < q.issued {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        q.stop = true;
        let rest = q
            .waiting
            .drain(..)
            .filter_map(|(_, c)| match c {
                Change::Close(f) => Some(f),
                Change::DirAttr(d) => {
                    tracing::warn!(path = %d.path, "a directory's mode/mtime change was not committed before unmount");
                    None
                }
                Change::Mkdir(d) => {
                    tracing::warn!(path = %d.path, "a directory made on the mount was not committed before unmount");
                    None
                }
            })
            .collect();
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

    fn push(&self, change: Change) -> u64 {
        let mut q = self.lock();
        q.issued += 1;
        let ticket = q.issued;
        q.waiting.push_back((ticket, change));
        // The committing thread needs waking only for a first change or a full batch: with
        // changes waiting it lingers until its deadline anyway, and waking it at every
        // close of a burst costs the closer a futex call and a CPU a context switch.
        if q.waiting.len() == 1 || q.waiting.len() >= BATCH_FILES_MAX {
            self.changed.notify_all();
        }
        ticket
    }

    fn run(&self) {
        loop {
            let batch: Vec<(u64, Change)> = {
                let mut q = self.lock();
                while q.waiting.is_empty() && !q.stop {
                    q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                // Within a burst, linger for more closes (see LINGER), unless someone waits
                // for the queue.
                let burst = q.last_sent_at.is_some_and(|t| t.elapsed() < QUIET_AFTER);
                let until = std::time::Instant::now() + LINGER;
                while burst && !q.stop && q.draining == 0 && q.waiting.len() < BATCH_FILES_MAX {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    q = self.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                if q.stop {
                    return;
                }
                let n = q.waiting.len().min(BATCH_FILES_MAX);
                let batch: Vec<(u64, Change)> = q.waiting.iter().take(n).cloned().collect();
                // From here on these go as they are: an amendment now would be lost.
                q.sent = batch.last().map(|(t, _)| *t).unwrap_or(q.sent);
                q.last_sent_at = Some(std::time::Instant::now());
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
                    drop(q); // the mount asks the queue at every stat of a queued change
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(e) => {
                    // Refused for what they are (not for the node being away): send them one
                    // by one so one bad file does not hold the others back.
                    for (t, c) in &batch {
                        if let Err(e1) = self.send(std::slice::from_ref(&(*t, c.clone()))) {
                            if e1.retry {
                                break;
                            }
                            match c {
                                Change::Close(f) => {
                                    tracing::error!(path = %f.path, error = %e1.message, "a closed file could not be committed; its old version stays");
                                    if let ClosedBytes::File(p) = &f.bytes {
                                        let _ = std::fs::remove_file(p);
                                    }
                                }
                                Change::DirAttr(d) => tracing::error!(path = %d.path, error = %e1.message, "a directory's mode/mtime change could not be committed"),
                                Change::Mkdir(d) => tracing::error!(path = %d.path, error = %e1.message, "a directory made on the mount could not be committed"),
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

    fn send(&self, batch: &[(u64, Change)]) -> Result<(), SendError> {
        let (mut items, mut attrs, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for (_, c) in batch {
            match c {
                Change::Close(f) => {
                    let (staging, data) = match &f.bytes {
                        ClosedBytes::Memory(d) => (None, Some(data_encoding::BASE64.encode(d))),
                        ClosedBytes::File(p) => (Some(p.clone()), None),
                    };
                    items.push(StagedFile { path: f.path.to_string(), staging, data, hash: f.hash.map(|h| h.to_hex()), size: Some(f.size), mode: f.mode, mtime_ms: f.mtime_ms });
                }
                // After the files, in the same transaction: a file commit does not change its
                // directory's attributes, so the order between the two does not matter.
                Change::DirAttr(d) => attrs.push(StagedAttr { path: d.path.to_string(), mode: d.mode, mtime_ms: d.mtime_ms }),
                // Before the files (the node applies them first): files may go into them.
                Change::Mkdir(d) => dirs.push(StagedDir { path: d.path.to_string(), mode: d.mode, mtime_ms: d.mtime_ms }),
            }
        }
        match self.node.call(&Request::PutStaged { scope: self.scope.clone(), items, attrs, dirs }) {
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
