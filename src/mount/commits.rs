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
//! **A close that returned 0 is a promise.** Every change is written to the mount's
//! [`Journal`] before it is acknowledged, with an id of its own (the mount's id and its
//! ticket), so a mount that dies leaves it for the node to commit; the node applies a change
//! once whatever number of times it is sent. A change the node did not commit (it is down
//! or restarting, the disk is full) stays queued and is sent again, after a pause that
//! grows while it keeps failing; its error is what the next `fsync` reports. Nothing is
//! counted as done until the node said it committed it.
//!
//! What a user sees: the mount shows a closed file's new bytes at once (the filesystem
//! layer reads queued files from their staging file); other processes (the CLI, a peer)
//! see it when its batch commits, milliseconds later. Operations that build on the
//! committed state (rename, unlink, reopening the file to change it, fsync) first wait for
//! the queue ([`Committer::drain`]). The queue is bounded ([`QUEUE_CHANGES_MAX`],
//! [`QUEUE_BYTES_MAX`]): past it, a close waits for room, and gets `EIO` if none comes.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::path::TreePath;
use alknet_actors::store::acked::Seen;

use super::journal::{Journal, Record};
use crate::control::client::Client;
use crate::control::{Reply, Request, StagedAttr, StagedDir, StagedFile, WireScope};

/// Most changes sent in one request (one transaction).
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
/// processes) about a millisecond after its close instead of ten.
const QUIET_AFTER: Duration = Duration::from_millis(50);
/// First pause before sending again what the node did not take; it doubles while sends
/// keep failing ...
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(250);
/// ... up to this.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);
/// Changes waiting at most: past it a close waits for room.
pub const QUEUE_CHANGES_MAX: usize = 16_384;
/// Bytes of small closed files held in memory at most: past it a close waits for room.
pub const QUEUE_BYTES_MAX: usize = 64 << 20;
/// How long a close waits for room before it fails with `EIO` (the node is not taking
/// changes: down, or its disk full).
pub const ROOM_WAIT: Duration = Duration::from_secs(10);

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
    /// The version its writer opened.
    pub seen: Seen,
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

impl Change {
    fn memory_bytes(&self) -> usize {
        match self {
            Change::Close(Closed { bytes: ClosedBytes::Memory(d), .. }) => d.len(),
            _ => 0,
        }
    }

    /// Its journal record and, for a small file, the bytes that go with it.
    fn record(&self, id: &str) -> (Record, &[u8]) {
        match self {
            Change::Close(f) => {
                let (staging, data): (Option<PathBuf>, &[u8]) = match &f.bytes {
                    ClosedBytes::Memory(d) => (None, &d[..]),
                    ClosedBytes::File(p) => (Some(p.clone()), &[]),
                };
                let file = StagedFile {
                    id: id.to_string(),
                    seen: f.seen.clone(),
                    path: f.path.to_string(),
                    staging,
                    data: None,
                    hash: f.hash.map(|h| h.to_hex()),
                    size: Some(f.size),
                    mode: f.mode,
                    mtime_ms: f.mtime_ms,
                };
                (Record::File(file), data)
            }
            Change::DirAttr(d) => (Record::Attr(StagedAttr { id: id.to_string(), path: d.path.to_string(), mode: d.mode, mtime_ms: d.mtime_ms }), &[]),
            Change::Mkdir(d) => (Record::Dir(StagedDir { id: id.to_string(), path: d.path.to_string(), mode: d.mode, mtime_ms: d.mtime_ms }), &[]),
        }
    }
}

/// A change in the queue.
#[derive(Clone, Debug)]
struct Waiting {
    ticket: u64,
    change: Change,
    /// The journal files its records are in (an amendment journals it again).
    journaled: Vec<u32>,
    /// When the node last failed to commit it, and why.
    failed: Option<(Instant, String)>,
}

struct Queue {
    /// Changes not committed yet, in ticket order.
    waiting: VecDeque<Waiting>,
    /// Tickets handed out so far (the last one).
    issued: u64,
    /// Every ticket up to this one is in the batch being sent: too late to amend.
    sent: u64,
    /// Callers of [`Committer::drain`] waiting now: the batch goes without lingering.
    draining: usize,
    /// When the last batch went (None: none yet).
    last_sent_at: Option<Instant>,
    /// Bytes of small files waiting.
    bytes: usize,
    journal: Journal,
    /// Set when the mount ends.
    stop: bool,
}

impl Queue {
    fn is_waiting(&self, t: u64) -> bool {
        self.waiting.binary_search_by_key(&t, |w| w.ticket).is_ok()
    }
}

struct Inner {
    queue: Mutex<Queue>,
    changed: Condvar,
    node: Client,
    scope: WireScope,
    /// This mount's id: with a ticket, the id of a change (unique, so the node applies each
    /// change once).
    mount_id: String,
}

/// The write-behind queue and its sending thread.
pub struct Committer {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why the queue did not take a change.
#[derive(Debug)]
pub struct Refused(pub std::io::Error);

impl Committer {
    /// Starts the sending thread; it commits on `node` into `scope`, journaling in
    /// `journal` (see [`super::journal`]).
    pub fn start(node: Client, scope: WireScope, journal: Journal, mount_id: String) -> Self {
        let queue = Queue { waiting: VecDeque::new(), issued: 0, sent: 0, draining: 0, last_sent_at: None, bytes: 0, journal, stop: false };
        let inner = Arc::new(Inner { queue: Mutex::new(queue), changed: Condvar::new(), node, scope, mount_id });
        let worker = inner.clone();
        let thread = std::thread::Builder::new().name("alkfs-commits".into()).spawn(move || worker.run()).expect("spawn the commit thread");
        Committer { inner, thread: Some(thread) }
    }

    /// The id of the change with ticket `t` (what a later change names as the version its
    /// writer saw, [`Seen::After`]).
    pub fn change_id(&self, t: u64) -> String {
        self.inner.change_id(t)
    }

    /// Queues `file` once it is journaled; returns its ticket (see [`is_done`](Self::is_done)).
    pub fn push(&self, file: Closed) -> Result<u64, Refused> {
        self.inner.push(Change::Close(file))
    }

    /// Queues a new directory; returns its ticket.
    pub fn push_mkdir(&self, dir: DirMade) -> Result<u64, Refused> {
        self.inner.push(Change::Mkdir(dir))
    }

    /// Queues a directory's new mode and/or mtime; a change of the same directory still
    /// waiting takes it instead. Returns the ticket that commits it.
    pub fn push_dir_attr(&self, attr: DirAttr) -> Result<u64, Refused> {
        {
            let mut q = self.inner.lock();
            let sent = q.sent;
            let found = q.waiting.iter().rposition(|w| w.ticket > sent && matches!(&w.change, Change::DirAttr(d) if d.path == attr.path));
            if let Some(i) = found {
                let Change::DirAttr(d) = &mut q.waiting[i].change else { unreachable!("matched above") };
                d.mode = attr.mode.or(d.mode);
                d.mtime_ms = attr.mtime_ms.or(d.mtime_ms);
                return self.inner.journal_again(&mut q, i);
            }
        }
        self.inner.push(Change::DirAttr(attr))
    }

    /// Whether ticket `t` is committed.
    pub fn is_done(&self, t: u64) -> bool {
        let q = self.inner.lock();
        t <= q.issued && !q.is_waiting(t)
    }

    /// Every ticket up to this one is committed.
    pub fn done_upto(&self) -> u64 {
        let q = self.inner.lock();
        q.waiting.front().map(|w| w.ticket - 1).unwrap_or(q.issued)
    }

    /// Changes the mode or mtime of inode `ino`'s file while it still waits (`chmod` or
    /// `utimes` right after close, as `tar` and `cp -p` do); false once it was sent.
    pub fn amend(&self, ino: u64, mode: Option<u32>, mtime_ms: Option<i64>) -> bool {
        let mut q = self.inner.lock();
        let sent = q.sent;
        let Some(i) = q.waiting.iter().rposition(|w| w.ticket > sent && matches!(&w.change, Change::Close(f) if f.ino == ino)) else { return false };
        let Change::Close(f) = &mut q.waiting[i].change else { unreachable!("matched above") };
        let before = (f.mode, f.mtime_ms);
        f.mode = mode.unwrap_or(f.mode);
        f.mtime_ms = mtime_ms.unwrap_or(f.mtime_ms);
        if self.inner.journal_again(&mut q, i).is_err() {
            // Not journaled: not amended either (the caller commits the change itself).
            if let Change::Close(f) = &mut q.waiting[i].change {
                (f.mode, f.mtime_ms) = before;
            }
            return false;
        }
        true
    }

    /// Waits until everything queued up to now is committed, at most `timeout`. Fails with
    /// the node's words when what waits failed to commit since the wait began (a full disk),
    /// or when the time is up (the node is down or slow): it stays queued and is sent again.
    pub fn drain(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut q = self.inner.lock();
        let target = q.issued;
        q.draining += 1;
        self.inner.changed.notify_all();
        let result = loop {
            let mine: Vec<&Waiting> = q.waiting.iter().take_while(|w| w.ticket <= target).collect();
            if mine.is_empty() || q.stop {
                break Ok(());
            }
            // Every change waited for failed again since the wait began: say so now.
            if mine.iter().all(|w| w.failed.as_ref().is_some_and(|(at, _)| *at >= started)) {
                let why = mine[0].failed.as_ref().map(|(_, e)| e.clone()).unwrap_or_default();
                break Err(format!("{} change(s) could not be committed: {why} (they stay queued and are sent again)", mine.len()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = mine.iter().find_map(|w| w.failed.as_ref().map(|(_, e)| format!(": {e}"))).unwrap_or_default();
                break Err(format!("{} change(s) not committed after {}s{why}: is the node running? (they stay queued and are sent again)", mine.len(), timeout.as_secs()));
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        };
        q.draining -= 1;
        result
    }

    /// Waits up to `timeout` for the queue to empty, then stops; returns how many changes
    /// still wait (they stay in the journal, and the node commits them).
    pub fn finish(mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut q = self.inner.lock();
        q.draining += 1;
        self.inner.changed.notify_all();
        while !q.waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self.inner.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        q.stop = true;
        let left = q.waiting.len();
        drop(q);
        self.inner.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        left
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change_id(&self, t: u64) -> String {
        format!("{}:{t}", self.mount_id)
    }

    /// Journals waiting change `i` again after it changed (the later record supersedes).
    fn journal_again(&self, q: &mut Queue, i: usize) -> Result<u64, Refused> {
        let ticket = q.waiting[i].ticket;
        let id = self.change_id(ticket);
        let (record, data) = q.waiting[i].change.record(&id);
        let data = data.to_vec();
        let file = q.journal.append(&record, &data).map_err(Refused)?;
        q.waiting[i].journaled.push(file);
        Ok(ticket)
    }

    fn push(&self, change: Change) -> Result<u64, Refused> {
        let mut q = self.lock();
        let deadline = Instant::now() + ROOM_WAIT;
        let bytes = change.memory_bytes();
        while q.waiting.len() >= QUEUE_CHANGES_MAX || (q.bytes > 0 && q.bytes + bytes > QUEUE_BYTES_MAX) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || q.stop {
                return Err(Refused(std::io::Error::other(format!(
                    "{} changes wait for the node to commit them and it took none for {}s: is it running? (see the mount's log)",
                    q.waiting.len(),
                    ROOM_WAIT.as_secs()
                ))));
            }
            q = self.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        let ticket = q.issued + 1;
        let (record, data) = change.record(&self.change_id(ticket));
        // On disk (in the page cache) before the change is acknowledged.
        let file = q.journal.append(&record, data).map_err(Refused)?;
        q.issued = ticket;
        q.bytes += bytes;
        q.waiting.push_back(Waiting { ticket, change, journaled: vec![file], failed: None });
        // The committing thread needs waking only for a first change or a full batch: with
        // changes waiting it lingers until its deadline anyway, and waking it at every
        // close of a burst costs the closer a futex call and a CPU a context switch.
        if q.waiting.len() == 1 || q.waiting.len() >= BATCH_FILES_MAX {
            self.changed.notify_all();
        }
        Ok(ticket)
    }

    fn run(&self) {
        let mut pause = Duration::ZERO;
        loop {
            let batch: Vec<Waiting> = {
                let mut q = self.lock();
                while q.waiting.is_empty() && !q.stop {
                    q = self.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                // After a failure, a pause (growing while failures go on) before trying
                // again; a drain does not cut it short, its caller hears of the failure.
                let until = Instant::now() + pause;
                while !q.stop && Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    q = self.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                // Within a burst, linger for more closes (see LINGER), unless someone waits
                // for the queue.
                let burst = q.last_sent_at.is_some_and(|t| t.elapsed() < QUIET_AFTER);
                let until = Instant::now() + LINGER;
                while burst && !q.stop && q.draining == 0 && q.waiting.len() < BATCH_FILES_MAX {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    q = self.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                if q.stop {
                    return;
                }
                let n = q.waiting.len().min(BATCH_FILES_MAX);
                let batch: Vec<Waiting> = q.waiting.iter().take(n).cloned().collect();
                // From here on these go as they are: an amendment now would be lost.
                q.sent = batch.last().map(|w| w.ticket).unwrap_or(q.sent);
                q.last_sent_at = Some(Instant::now());
                batch
            };
            let outcome = self.send(&batch);
            let mut q = self.lock();
            let failures = match outcome {
                Ok(failed) => {
                    let now = Instant::now();
                    for w in &batch {
                        let id = self.change_id(w.ticket);
                        match failed.iter().find(|(f, _)| *f == id) {
                            Some((_, why)) => {
                                if let Ok(i) = q.waiting.binary_search_by_key(&w.ticket, |x| x.ticket) {
                                    q.waiting[i].failed = Some((now, why.clone()));
                                }
                            }
                            None => {
                                if let Ok(i) = q.waiting.binary_search_by_key(&w.ticket, |x| x.ticket) {
                                    let done = q.waiting.remove(i).expect("found");
                                    q.bytes -= done.change.memory_bytes();
                                    for file in done.journaled {
                                        q.journal.done(file);
                                    }
                                }
                            }
                        }
                    }
                    if !failed.is_empty() {
                        tracing::warn!(changes = failed.len(), error = %failed[0].1, "the node did not commit changes; they stay queued (and visible in the mount) and are sent again");
                    }
                    failed.len()
                }
                Err(why) => {
                    tracing::warn!(changes = batch.len(), error = %why, "the node did not take changes; they stay queued (and visible in the mount) and are sent again");
                    let now = Instant::now();
                    for w in &batch {
                        if let Ok(i) = q.waiting.binary_search_by_key(&w.ticket, |x| x.ticket) {
                            q.waiting[i].failed = Some((now, why.clone()));
                        }
                    }
                    batch.len()
                }
            };
            if failures > 0 {
                q.sent = 0; // not taken: amendable until the next try
                pause = (pause * 2).clamp(RETRY_PAUSE_MIN, RETRY_PAUSE_MAX);
            } else {
                pause = Duration::ZERO;
            }
            self.changed.notify_all();
        }
    }

    /// Sends `batch`; the ids of the changes the node did not commit, with why. `Err` when
    /// none was committed (no answer, or a refusal of the whole request).
    fn send(&self, batch: &[Waiting]) -> Result<Vec<(String, String)>, String> {
        let (mut items, mut attrs, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for w in batch {
            let id = self.change_id(w.ticket);
            match w.change.record(&id).0 {
                Record::File(mut f) => {
                    if let Change::Close(Closed { bytes: ClosedBytes::Memory(d), .. }) = &w.change {
                        f.data = Some(data_encoding::BASE64.encode(d));
                    }
                    items.push(f);
                }
                // After the files, in the same transaction: a file commit does not change its
                // directory's attributes, so the order between the two does not matter.
                Record::Attr(a) => attrs.push(a),
                // Before the files (the node applies them first): files may go into them.
                Record::Dir(d) => dirs.push(d),
                Record::Scope(_) => {}
            }
        }
        match self.node.call(&Request::PutStaged { scope: self.scope.clone(), items, attrs, dirs }) {
            Ok(Reply::Staged { failed }) => Ok(failed.into_iter().map(|f| (f.id, f.error)).collect()),
            Ok(other) => Err(format!("the node answered {other:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}
