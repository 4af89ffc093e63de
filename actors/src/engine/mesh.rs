//! The store's half of the mesh: each shared bucket's replicated documents, kept in memory
//! by the node's writer and saved in `tree.db` in the same transaction as what they caused.
//!
//! - **publish**: the outbox is the one road out. The `mesh` consumer reads committed events
//!   and puts the versions this node wrote (and its new branches) into the documents of
//!   shared buckets, saving the documents' increments and its cursor in one transaction —
//!   writes the CLI made while no node ran are published when the node starts.
//! - **receive**: a peer's sync message is applied to one document; the entries it added are
//!   checked and applied to the tree in one transaction with the document's increment and
//!   their outbox event. If that transaction fails the document is dropped from memory and
//!   read back from the database, so the two never disagree.
//! - **membership**: invitations (a hash of the secret, an expiry, a number of uses), the
//!   inviter's admission of a joiner (its member entry goes into the bucket's document), the
//!   joiner's adoption of the bucket, removals; members and addresses are read from the
//!   bucket's document into `mesh_member` / `mesh_addr` for the network side to consult.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use rusqlite::{params, Connection, OptionalExtension};

use super::replica::BucketIdentity;
use super::{Engine, Result};
use crate::proto::clock::Bound;
use crate::proto::doc::{decode_state, encode_state, CheckedMessage, DocError, PeerState, ReplicaDoc};
use super::doc_cache::DocCache;
use crate::proto::fanout;
use crate::proto::ids::{NodeId, Uid};
use crate::proto::membership::{Membership, Role};
use crate::proto::replica::{self as rules, BranchRecord, Change, MetaEntry};
use crate::proto::signed::{self, EntrySigner};
use crate::proto::sync::{DOCS, META_DOC};
use crate::proto::ticket::{admit, InviteTerms, JoinRefusal, SECRET_BYTES};
use crate::store::outbox;
use crate::store::replica::{branch_record, own_changes, Applied};
use crate::store::waiting::{self, WaitBounds, WaitHit, Waiting};
use crate::store::{Ids, StoreError, Tx};

/// The outbox consumer that publishes this node's writes to its peers (it never expires).
pub const MESH_CONSUMER: &str = outbox::PUBLISHER;

/// Increments kept per document before it is saved whole again.
const DOC_PARTS_MAX: i64 = 64;

/// What a publish round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// Documents that changed (bucket, document): their peers are told.
    pub changed: Vec<(Uid, u16)>,
    /// Events read.
    pub events: usize,
}

/// What a received sync message did.
#[derive(Debug, Default)]
pub struct Received {
    /// Versions applied, blobs now missing, conflicts listed.
    pub applied: Applied,
    /// Membership changed (the network side re-checks its sessions).
    pub members_changed: bool,
    /// Entries the message added to the document.
    pub entries: usize,
    /// The answer to send back, when there is something to say
    /// ([`crate::proto::fanout::worth_answering`]).
    pub answer: Option<Vec<u8>>,
    /// The epoch of the bucket's shards here (what the answer is of).
    pub epoch: u32,
}

/// A member of a bucket, for `alkfs members`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Its node id.
    pub node: NodeId,
    /// When it was added (ms).
    pub added_ms: i64,
    /// Who added it.
    pub added_by: Option<NodeId>,
    /// When it was removed, if it was.
    pub removed_ms: Option<i64>,
    /// Where it listens, as last announced.
    pub addrs: Vec<SocketAddr>,
    /// What it may do, as the bucket's document says (`None` until this node has read it).
    pub role: Option<Role>,
}

/// The documents of shared buckets and the sync states of connected peers.
pub struct Mesh {
    me: NodeId,
    /// Signs every entry this node writes into a document (its node key).
    signer: EntrySigner,
    /// The automerge actor of this process: the node id and a random part (see
    /// [`ReplicaDoc::new`]).
    pub(super) actor: Vec<u8>,
    /// Documents in memory, within a budget (`node.doc_cache_mib`).
    pub(super) docs: DocCache,
    pub(super) states: HashMap<(NodeId, i64, u16), PeerState>,
    /// Each shared bucket's membership, read from its document (dropped when that changes).
    members: HashMap<i64, Membership>,
    /// What waits for peers: its bounds, its counts, the bounds hit (`store::waiting`).
    waiting: Waiting,
    /// Each connected peer's last summary of each bucket (epoch, digests): whether every
    /// member is at this node's heads, for compaction (`engine::compaction`).
    pub(super) peer_summaries: HashMap<(NodeId, i64), (u32, Vec<u64>)>,
    /// When a bucket's shards are compacted (`node.compact_after_kib`).
    pub(super) compact_after: u64,
    /// Each shared bucket's epoch, read once (`engine::compaction`).
    pub(super) epochs: HashMap<i64, super::compaction::EpochRow>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("me", &self.me).field("docs", &self.docs.len()).finish()
    }
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::Invalid(msg.into())
}

impl Mesh {
    /// The mesh state of the store `engine` opened, signing with the node key in its data dir.
    pub fn new(engine: &Engine) -> Result<Self> {
        let me = engine.tree().me();
        let key = crate::identity::load_or_create(engine.dir()).map_err(|e| invalid(e.to_string()))?;
        let signer = EntrySigner::new(&key.to_bytes());
        if signer.id() != me {
            return Err(invalid(format!("the node key in {} is not the key of this store's node {me}: restore the data dir's node.key", engine.dir().display())).into());
        }
        let mut actor = me.0.to_vec();
        actor.extend_from_slice(&std::collections::hash_map::RandomState::new().build_hasher().finish().to_be_bytes());
        Ok(Mesh {
            me,
            signer,
            actor,
            docs: DocCache::default(),
            states: HashMap::new(),
            members: HashMap::new(),
            waiting: Waiting::default(),
            peer_summaries: HashMap::new(),
            compact_after: super::compaction::COMPACT_AFTER_DEFAULT_BYTES,
            epochs: HashMap::new(),
        })
    }

    /// The most memory documents in memory may take (bytes, estimated); [`Mesh::trim`]
    /// keeps to it.
    pub fn set_doc_budget(&mut self, bytes: usize) {
        self.docs.set_budget(bytes);
    }

    /// Drops the least recently used documents over the budget (they are read back when
    /// next used). The node calls it after every operation ([`Mesh::run`]).
    pub fn trim(&mut self) -> usize {
        self.docs.trim()
    }

    /// Documents in memory, and the memory they take (bytes, estimated).
    pub fn docs_in_memory(&self) -> (usize, usize) {
        (self.docs.len(), self.docs.bytes())
    }

    /// Signs `body` as the value of `key` and puts it into document `doc` of bucket
    /// `bucket_id` (whose identity is `uid`); false if the key was there already.
    fn put_signed(&mut self, conn: &Connection, (bucket_id, uid): (i64, &Uid), doc: u16, key: &str, body: &[u8]) -> Result<bool, StoreError> {
        if self.doc(conn, bucket_id, doc)?.contains(key) {
            return Ok(false);
        }
        let value = self.signer.seal(uid, key, body);
        self.doc(conn, bucket_id, doc)?.put(key, &value).map_err(|e| invalid(e.to_string()))
    }

    /// Bounds what waits for peers by `bounds` instead of `proto::limits`' (tests make them
    /// small).
    pub fn set_wait_bounds(&mut self, bounds: WaitBounds) {
        self.waiting = Waiting::new(bounds);
    }

    /// The bounds on what waits that were hit since the last call, for `alkfs status`.
    pub fn take_wait_hits(&mut self) -> Vec<WaitHit> {
        self.waiting.take_hits()
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Reads document `doc` of bucket `bucket_id` from the database, and its saved size.
    fn load(&self, conn: &Connection, bucket_id: i64, doc: u16) -> Result<(ReplicaDoc, usize), StoreError> {
        let mut st = conn.prepare_cached("SELECT data FROM mesh_doc WHERE bucket_id = ?1 AND doc = ?2 ORDER BY part")?;
        let parts: Vec<Vec<u8>> = st.query_map(params![bucket_id, doc], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let saved = parts.iter().map(Vec::len).sum();
        let (full, increments) = match parts.split_first() {
            Some((full, rest)) => (full.as_slice(), rest.iter().map(|p| p.as_slice()).collect::<Vec<_>>()),
            None => (&[][..], Vec::new()),
        };
        let loaded = ReplicaDoc::load(full, &increments, &self.actor).map_err(|e| invalid(format!("the saved replica of bucket {bucket_id} doc {doc} is damaged: {e}")))?;
        Ok((loaded, saved))
    }

    pub(super) fn doc(&mut self, conn: &Connection, bucket_id: i64, doc: u16) -> Result<&mut ReplicaDoc, StoreError> {
        if !self.docs.contains_key(&(bucket_id, doc)) {
            let (loaded, saved) = self.load(conn, bucket_id, doc)?;
            self.docs.insert((bucket_id, doc), loaded, saved);
        }
        Ok(self.docs.get_mut(&(bucket_id, doc)).expect("just loaded"))
    }

    /// Saves what changed in `doc` since its last save, in the open transaction: an
    /// increment, or the whole document when it has gathered many.
    pub(super) fn persist(&mut self, tx: &Tx<'_>, bucket_id: i64, doc: u16) -> Result<(), StoreError> {
        let d = self.docs.get_mut(&(bucket_id, doc)).expect("persisted docs are loaded");
        let conn = tx.conn();
        let last: Option<i64> = conn.query_row("SELECT max(part) FROM mesh_doc WHERE bucket_id = ?1 AND doc = ?2", params![bucket_id, doc], |r| r.get(0))?;
        match last {
            Some(n) if n < DOC_PARTS_MAX => {
                let inc = d.save_incremental();
                if !inc.is_empty() {
                    conn.execute("INSERT INTO mesh_doc(bucket_id, doc, part, data) VALUES (?1, ?2, ?3, ?4)", params![bucket_id, doc, n + 1, inc])?;
                    self.docs.grew(&(bucket_id, doc), inc.len());
                }
            }
            _ => {
                let full = d.save();
                conn.execute("DELETE FROM mesh_doc WHERE bucket_id = ?1 AND doc = ?2", params![bucket_id, doc])?;
                conn.execute("INSERT INTO mesh_doc(bucket_id, doc, part, data) VALUES (?1, ?2, 0, ?3)", params![bucket_id, doc, full])?;
                self.docs.saved_as(&(bucket_id, doc), full.len());
            }
        }
        let d = self.docs.get_mut(&(bucket_id, doc)).expect("persisted docs are loaded");
        let digest = d.digest() as i64;
        let heads = fanout::encode_heads(&d.heads());
        conn.prepare_cached(
            "INSERT INTO mesh_digest(bucket_id, doc, digest, heads) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(bucket_id, doc) DO UPDATE SET digest = excluded.digest, heads = excluded.heads",
        )?
        .execute(params![bucket_id, doc, digest, heads])?;
        Ok(())
    }

    /// Forgets in-memory documents a failed transaction may have left ahead of the database.
    fn forget(&mut self, touched: &HashSet<(i64, u16)>) {
        for key in touched {
            self.docs.remove(key);
            if key.1 == META_DOC {
                self.members.remove(&key.0);
            }
        }
    }

    /// Bucket `bucket_id`'s membership, as its document (in memory) decides it.
    fn membership(&mut self, conn: &Connection, bucket_id: i64) -> Result<Membership, StoreError> {
        if let Some(m) = self.members.get(&bucket_id) {
            return Ok(m.clone());
        }
        let uid = bucket_uid(conn, bucket_id)?;
        let entries = meta_entries(self.doc(conn, bucket_id, META_DOC)?);
        let m = Membership::from_entries(uid, &entries);
        self.members.insert(bucket_id, m.clone());
        Ok(m)
    }

    /// Publishes what this node committed since the last round (at most one batch of
    /// events): its versions and branches, into the documents of shared buckets.
    pub fn publish(&mut self, engine: &mut Engine) -> Result<Published> {
        let now = engine.now_ms();
        let conn = engine.tree().conn();
        let shared = shared_bucket_ids(conn)?;
        if shared.is_empty() {
            // Nothing shared: no consumer, so a lone node's outbox is not held back.
            return Ok(Published::default());
        }
        let cursor = outbox::cursor(conn, MESH_CONSUMER)?;
        let events = outbox::read_after(conn, cursor, outbox::READ_BATCH_EVENTS_MAX)?;
        let Some(last) = events.last().map(|(o, _)| *o) else { return Ok(Published::default()) };
        let mut puts: Vec<(i64, u16, String, Vec<u8>)> = Vec::new();
        for (_, event) in &events {
            if !shared.contains(&event.bucket_id) {
                continue;
            }
            match event.op.as_str() {
                "replicated" => {}
                "branch-delete" => {
                    let uid: Option<Vec<u8>> = conn
                        .query_row("SELECT uid FROM branch WHERE bucket_id = ?1 AND name = ?2 AND deleted_seq = ?3", params![event.bucket_id, event.branch, event.first_seq], |r| r.get(0))
                        .optional()
                        .map_err(StoreError::from)?;
                    if let Some(uid) = uid.and_then(|u| Uid::from_bytes(&u)) {
                        let e = MetaEntry::BranchDeleted { uid, by: self.me, at_ms: now };
                        puts.push((event.bucket_id, META_DOC, e.key(), e.value()));
                    }
                }
                "branch-create" | "bucket-create" => {
                    if let Ok(b) = crate::store::branch_by_name(conn, event.bucket_id, &event.branch) {
                        let rec = MetaEntry::Branch(branch_record(conn, &b)?);
                        puts.push((event.bucket_id, META_DOC, rec.key(), rec.value()));
                    }
                }
                _ => {
                    // One event is one operation: its versions travel marked as one, so a
                    // peer applies them together (they may live in different shards).
                    let mut changes = own_changes(conn, &self.me, event.first_seq, event.last_seq)?;
                    rules::mark_commit(&mut changes);
                    for change in changes {
                        puts.push((event.bucket_id, rules::shard_of(&change.branch, &change.path), rules::doc_key(&change.id()), rules::encode(&change)));
                    }
                }
            }
        }
        let uids = bucket_uids(engine.tree().conn())?;
        let mut touched = HashSet::new();
        for (bucket_id, doc, key, body) in &puts {
            let Some(uid) = uids.get(bucket_id) else { continue };
            if self.put_signed(engine.tree().conn(), (*bucket_id, uid), *doc, key, body)? {
                touched.insert((*bucket_id, *doc));
            }
        }
        let result = engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            for (bucket_id, doc) in &touched {
                self.persist(tx, *bucket_id, *doc)?;
            }
            outbox::save_cursor(tx.conn(), MESH_CONSUMER, last, now)
        });
        if let Err(e) = result {
            self.forget(&touched);
            return Err(e.into());
        }
        let changed = touched.iter().filter_map(|(b, d)| uids.get(b).map(|u| (*u, *d))).collect();
        Ok(Published { changed, events: events.len() })
    }

    /// Makes bucket `bucket_id` shared from this node's side: its whole history, branches and
    /// this node's membership go into its documents (once; later writes are published from
    /// the outbox), and the `mesh` consumer starts from the outbox's head if it is new.
    fn share(&mut self, engine: &mut Engine, bucket: &BucketIdentity, addrs: &[SocketAddr], with_history: bool) -> Result<()> {
        let conn = engine.tree().conn();
        let already: bool = conn
            .query_row("SELECT 1 FROM mesh_member WHERE bucket_id = ?1 AND node = ?2", params![bucket.id, self.me.0], |_| Ok(()))
            .optional()
            .map_err(StoreError::from)?
            .is_some();
        let now = engine.now_ms();
        let mut puts: Vec<(u16, String, Vec<u8>)> = Vec::new();
        if !already && with_history {
            // Only what this node wrote: it signs for nothing else (a bucket shared afresh
            // holds only its own versions and branches).
            for rec in engine.branch_records(&bucket.name)?.into_iter().filter(|r| r.uid.is_minted_by(&self.me)) {
                let e = MetaEntry::Branch(rec);
                puts.push((META_DOC, e.key(), e.value()));
            }
            for change in crate::store::replica::bucket_changes(engine.tree().conn(), bucket.id)?.into_iter().filter(|c| c.id().node == self.me) {
                puts.push((rules::shard_of(&change.branch, &change.path), rules::doc_key(&change.id()), rules::encode(&change)));
            }
        }
        if !already {
            if !bucket.uid.is_minted_by(&self.me) {
                return Err(invalid(format!("bucket {} was made on another node: join it with a ticket from one of its members", bucket.name)).into());
            }
            let me = MetaEntry::Member { node: self.me, added_by: self.me, at_ms: now, role: Role::Owner };
            puts.push((META_DOC, me.key(), me.value()));
        }
        // Where this node listens, when that changed (entries are written once: a new one
        // each time; the latest counts).
        let me = self.me;
        let latest = latest_addrs(self.doc(engine.tree().conn(), bucket.id, META_DOC)?, &me);
        if !addrs.is_empty() && latest.as_deref() != Some(addrs) {
            let e = MetaEntry::Addrs { node: self.me, at_ms: now, addrs: addrs.to_vec() };
            puts.push((META_DOC, e.key(), e.value()));
        }
        self.members.remove(&bucket.id);
        let mut touched = HashSet::new();
        for (doc, key, body) in &puts {
            if self.put_signed(engine.tree().conn(), (bucket.id, &bucket.uid), *doc, key, body)? {
                touched.insert((bucket.id, *doc));
            }
        }
        let me = self.me;
        let my_role = self.membership(engine.tree().conn(), bucket.id)?.role(&me).map(Role::as_str);
        let result = engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            for (bucket_id, doc) in &touched {
                self.persist(tx, *bucket_id, *doc)?;
            }
            let conn = tx.conn();
            conn.execute(
                "INSERT OR IGNORE INTO mesh_member(bucket_id, node, added_ms, added_by) VALUES (?1, ?2, ?3, ?2)",
                params![bucket.id, me.0, now],
            )?;
            conn.execute("UPDATE mesh_member SET role = ?3 WHERE bucket_id = ?1 AND node = ?2 AND ?3 IS NOT NULL", params![bucket.id, me.0, my_role])?;
            if !addrs.is_empty() {
                record_addrs(conn, &me, addrs, now)?;
            }
            if outbox::consumers(conn, 0)?.iter().all(|c| c.name != MESH_CONSUMER) {
                outbox::save_cursor(conn, MESH_CONSUMER, outbox::head(conn)?, now)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            self.forget(&touched);
            return Err(e.into());
        }
        Ok(())
    }

    /// Records where this node listens in every bucket it shares (so members can dial it).
    pub fn announce_addrs(&mut self, engine: &mut Engine, addrs: &[SocketAddr]) -> Result<Vec<(Uid, u16)>> {
        let shared = shared_bucket_ids(engine.tree().conn())?;
        let uids = bucket_uids(engine.tree().conn())?;
        let mut changed = Vec::new();
        for bucket_id in shared {
            let Some(uid) = uids.get(&bucket_id) else { continue };
            let name = bucket_name(engine.tree().conn(), bucket_id)?;
            self.share(engine, &BucketIdentity { id: bucket_id, name, uid: *uid }, addrs, true)?;
            changed.push((*uid, META_DOC));
        }
        Ok(changed)
    }

    /// Makes an invitation to bucket `name`: returns the bucket's id and the secret, of which
    /// only a hash is kept. The bucket becomes shared if it was not.
    pub fn invite(&mut self, engine: &mut Engine, name: &str, terms: (i64, u32, Role), addrs: &[SocketAddr]) -> Result<(Uid, [u8; SECRET_BYTES])> {
        let (expires_ms, uses, role) = terms;
        let bucket = engine.bucket_identity(name)?;
        self.share(engine, &bucket, addrs, true)?;
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        if !members.may_invite(&self.me) {
            let why = match members.role(&self.me) {
                Some(Role::Writer) => ", and it does not let writers invite",
                Some(_) => ", and this node is a read-only member",
                None => ", and this node is not a member of it yet (its admission may still be on its way)",
            };
            return Err(invalid(format!("only an owner of bucket {name} can invite{why} (see `alkfs members`); ask an owner for a ticket")).into());
        }
        if role == Role::Owner && members.role(&self.me) != Some(Role::Owner) {
            return Err(invalid(format!("only an owner of bucket {name} can invite an owner; invite a writer or a read-only member")).into());
        }
        let key = iroh::SecretKey::generate();
        let mut secret = [0u8; SECRET_BYTES];
        secret.copy_from_slice(&key.to_bytes()[..SECRET_BYTES]);
        let now = engine.now_ms();
        engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            tx.conn().execute(
                "INSERT INTO mesh_invite(secret_hash, bucket_id, expires_ms, uses_left, created_ms, role) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![blake3::hash(&secret).as_bytes().to_vec(), bucket.id, now.saturating_add(expires_ms), uses, now, role.as_str()],
            )?;
            Ok(())
        })?;
        Ok((bucket.uid, secret))
    }

    /// The inviter's side of a join: checks the secret for bucket `uid`, uses the invitation
    /// up, and adds `joiner` as a member (with its addresses). Returns the bucket's name here
    /// and its root branch, or why the join is refused.
    pub fn admit(&mut self, engine: &mut Engine, uid: &Uid, secret: &[u8; SECRET_BYTES], joiner: &NodeId, addrs: &[SocketAddr]) -> Result<std::result::Result<(String, BranchRecord), JoinRefusal>> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(Err(JoinRefusal::UnknownSecret)) };
        let now = engine.now_ms();
        let hash = blake3::hash(secret).as_bytes().to_vec();
        let after = match admissible(engine.tree().conn(), uid, secret, joiner, now)? {
            Ok(after) => after,
            Err(why) => return Ok(Err(why)),
        };
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        if !members.may_invite(&self.me) {
            return Ok(Err(JoinRefusal::NotAnOwner));
        }
        let role: String = engine.tree().conn().query_row("SELECT role FROM mesh_invite WHERE secret_hash = ?1", [&hash], |r| r.get(0)).map_err(StoreError::from)?;
        // A role this build does not know grants the least; a writer admits a writer at most.
        let role = Role::parse(&role).unwrap_or(Role::ReadOnly).min(members.role(&self.me).unwrap_or(Role::ReadOnly));
        let member = MetaEntry::Member { node: *joiner, added_by: self.me, at_ms: now, role };
        self.put_signed(engine.tree().conn(), (bucket.id, &bucket.uid), META_DOC, &member.key(), &member.value())?;
        self.members.remove(&bucket.id);
        let touched = HashSet::from([(bucket.id, META_DOC)]);
        let me = self.me;
        let result = engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            self.persist(tx, bucket.id, META_DOC)?;
            let conn = tx.conn();
            conn.execute("UPDATE mesh_invite SET uses_left = ?1 WHERE secret_hash = ?2", params![after.uses_left, hash])?;
            conn.execute(
                "INSERT OR IGNORE INTO mesh_member(bucket_id, node, added_ms, added_by, role) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![bucket.id, joiner.0, now, me.0, role.as_str()],
            )?;
            record_addrs(conn, joiner, addrs, now)?;
            Ok(())
        });
        if let Err(e) = result {
            self.forget(&touched);
            return Err(e.into());
        }
        let root = engine.branch_records(&bucket.name)?.into_iter().find(|b| b.parent.is_none()).ok_or_else(|| invalid("the bucket has no root branch"))?;
        Ok(Ok((bucket.name, root)))
    }

    /// The joiner's side, once admitted: makes local bucket `name` the shared one (a new
    /// bucket, or an empty one taken over), records the inviter as a member with its
    /// addresses, and shares it from this side.
    pub fn adopt(&mut self, engine: &mut Engine, a: &Adoption) -> Result<BucketIdentity> {
        let (inviter, inviter_addrs, my_addrs) = (&a.inviter, &a.inviter_addrs, &a.my_addrs);
        let bucket = engine.adopt_bucket(&a.name, &a.bucket, &a.root)?;
        let now = engine.now_ms();
        engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            let conn = tx.conn();
            // Only an owner admits.
            conn.execute("INSERT OR IGNORE INTO mesh_member(bucket_id, node, added_ms, added_by, role) VALUES (?1, ?2, ?3, ?2, 'owner')", params![bucket.id, inviter.0, now])?;
            // Its own admission is the inviter's entry (it arrives with the bucket's
            // document): the joiner writes none of its own, which would make it a first
            // member that no removal of its inviter could reach (proto::membership).
            conn.execute("INSERT OR IGNORE INTO mesh_member(bucket_id, node, added_ms, added_by) VALUES (?1, ?2, ?3, ?4)", params![bucket.id, self.me.0, now, inviter.0])?;
            record_addrs(conn, inviter, inviter_addrs, now)?;
            Ok(())
        })?;
        // Its branches and history are the inviter's: they arrive by sync.
        self.share(engine, &bucket, my_addrs, false)?;
        Ok(bucket)
    }

    /// Removes `node` from bucket `name` (for good; a removal wins over any addition).
    pub fn remove_member(&mut self, engine: &mut Engine, name: &str, node: &NodeId) -> Result<Uid> {
        let bucket = engine.bucket_identity(name)?;
        let known = members(engine.tree().conn(), bucket.id)?.iter().any(|m| m.node == *node);
        if !known {
            return Err(invalid(format!("{node} is not a member of bucket {name} (see `alkfs members`)")).into());
        }
        if *node == self.me {
            return Err(invalid("a node cannot remove itself; remove it from another member").into());
        }
        if self.membership(engine.tree().conn(), bucket.id)?.role(&self.me) != Some(Role::Owner) {
            return Err(invalid(format!("only an owner of bucket {name} can remove members (see `alkfs members`)")).into());
        }
        let now = engine.now_ms();
        // What this node had seen of it: its versions here, whom it had admitted. Whatever it
        // does after that (unaware of its removal) falls on every node (proto::membership).
        let conn = engine.tree().conn();
        let last_seq = last_seq_of(conn, bucket.id, node)?;
        let seen = self.membership(conn, bucket.id)?.seen_of(node, last_seq);
        let entry = MetaEntry::Removed { node: *node, by: self.me, at_ms: now, seen };
        self.put_signed(engine.tree().conn(), (bucket.id, &bucket.uid), META_DOC, &entry.key(), &entry.value())?;
        self.membership_changed(engine, &bucket, now)?;
        Ok(bucket.uid)
    }

    /// After this node wrote a membership entry into bucket `bucket`'s document: saves it and
    /// brings the tables and the tree in line with what the membership now decides, in one
    /// transaction (or forgets the document if that fails).
    fn membership_changed(&mut self, engine: &mut Engine, bucket: &BucketIdentity, now: i64) -> Result<()> {
        self.members.remove(&bucket.id);
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        let me = self.me;
        let result = engine.tree_mut().transact(Ids::Unbounded, now, |tx| -> Result<(), StoreError> {
            self.persist(tx, bucket.id, META_DOC)?;
            reconcile_members(tx, bucket.id, &members, &me, now, &mut self.waiting)
        });
        if let Err(e) = result {
            self.forget(&HashSet::from([(bucket.id, META_DOC)]));
            return Err(e.into());
        }
        Ok(())
    }

    /// Gives member `node` of bucket `name` role `role` (an owner's act; an owner stays one).
    /// A member made read-only keeps the versions this node had of it.
    pub fn grant_role(&mut self, engine: &mut Engine, name: &str, node: &NodeId, role: Role) -> Result<Uid> {
        let bucket = engine.bucket_identity(name)?;
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        if members.role(&self.me) != Some(Role::Owner) {
            return Err(invalid(format!("only an owner of bucket {name} can grant roles (see `alkfs members`)")).into());
        }
        match members.role(node) {
            None => return Err(invalid(format!("{node} is not a member of bucket {name} (see `alkfs members`)")).into()),
            Some(Role::Owner) => return Err(invalid(format!("{node} is an owner of bucket {name}: an owner is removed, not demoted")).into()),
            Some(_) => {}
        }
        let now = engine.now_ms();
        let last_seq = last_seq_of(engine.tree().conn(), bucket.id, node)?;
        let admitted = members.seen_of(node, last_seq).admitted;
        let entry = MetaEntry::Grant { node: *node, by: self.me, at_ms: now, role, last_seq, admitted };
        if !self.put_signed(engine.tree().conn(), (bucket.id, &bucket.uid), META_DOC, &entry.key(), &entry.value())? {
            return Err(invalid("a role was granted to that member this very millisecond; try again").into());
        }
        self.membership_changed(engine, &bucket, now)?;
        Ok(bucket.uid)
    }

    /// Lets writers of bucket `name` invite (`members_invite`), or only owners (an owner's
    /// act). Turning it off keeps the members writers had admitted so far, as this node
    /// knows them; later ones fall.
    pub fn set_invite_policy(&mut self, engine: &mut Engine, name: &str, members_invite: bool) -> Result<Uid> {
        let bucket = engine.bucket_identity(name)?;
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        if members.role(&self.me) != Some(Role::Owner) {
            return Err(invalid(format!("only an owner of bucket {name} can say who may invite (see `alkfs members`)")).into());
        }
        let now = engine.now_ms();
        let entry = MetaEntry::Policy { by: self.me, at_ms: now, members_invite, admitted: members.admitted_by_members() };
        if !self.put_signed(engine.tree().conn(), (bucket.id, &bucket.uid), META_DOC, &entry.key(), &entry.value())? {
            return Err(invalid("the policy was set this very millisecond; try again").into());
        }
        self.membership_changed(engine, &bucket, now)?;
        Ok(bucket.uid)
    }

    /// A digest of each document of bucket `uid` (empty if this store lacks the bucket).
    pub fn summary(&mut self, engine: &Engine, uid: &Uid) -> Result<Vec<u64>> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(Vec::new()) };
        let conn = engine.tree().conn();
        // Documents in memory answer for themselves; the others from their saved digest,
        // without loading them (see schema 5).
        let saved: HashMap<u16, u64> = (|| -> Result<_, StoreError> {
            let mut st = conn.prepare_cached("SELECT doc, digest FROM mesh_digest WHERE bucket_id = ?1")?;
            let rows = st.query_map([bucket.id], |r| Ok((r.get::<_, i64>(0)? as u16, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })()?;
        let mut out = Vec::with_capacity(DOCS as usize);
        for doc in 0..DOCS {
            let digest = match (self.docs.get_mut(&(bucket.id, doc)), saved.get(&doc)) {
                (Some(d), _) => d.digest(),
                (None, Some(&digest)) => digest,
                (None, None) => self.doc(conn, bucket.id, doc)?.digest(),
            };
            out.push(digest);
        }
        Ok(out)
    }

    /// The documents of bucket `uid` whose digests differ from `theirs`, a summary `peer`
    /// sent; the next message on each speaks (`proto::fanout::speak_again`). On the others
    /// the peer is in step with this node: its sync states are set so (`proto::fanout::in_step`),
    /// so the next change there goes in one frame. Heads come from documents in memory or
    /// from beside their digests; none are loaded for this.
    pub fn compare(&mut self, engine: &Engine, peer: &NodeId, uid: &Uid, theirs: &[u64]) -> Result<Vec<u16>> {
        let ours = self.summary(engine, uid)?;
        let differ = crate::proto::sync::differing(&ours, theirs);
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(differ) };
        let conn = engine.tree().conn();
        let epoch = self.epoch_row(conn, bucket.id)?.epoch;
        self.peer_summaries.insert((*peer, bucket.id), (epoch, theirs.to_vec()));
        let saved: HashMap<u16, (u64, Vec<u8>)> = (|| -> Result<_, StoreError> {
            let mut st = conn.prepare_cached("SELECT doc, digest, heads FROM mesh_digest WHERE bucket_id = ?1 AND heads IS NOT NULL")?;
            let rows = st.query_map([bucket.id], |r| Ok((r.get::<_, i64>(0)? as u16, (r.get::<_, i64>(1)? as u64, r.get::<_, Vec<u8>>(2)?))))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })()?;
        for doc in &differ {
            if let Some(state) = self.states.get_mut(&(*peer, bucket.id, *doc)) {
                fanout::speak_again(state);
            }
        }
        for doc in (0..DOCS).filter(|d| !differ.contains(d) && (*d as usize) < theirs.len()) {
            let heads = match self.docs.get_mut(&(bucket.id, doc)) {
                Some(d) => Some(d.heads()),
                None => saved.get(&doc).filter(|(digest, _)| *digest == theirs[doc as usize]).and_then(|(_, h)| fanout::decode_heads(h)),
            };
            if let Some(heads) = heads {
                fanout::in_step(self.state(conn, peer, bucket.id, doc)?, &heads);
            }
        }
        Ok(differ)
    }

    fn state(&mut self, conn: &Connection, peer: &NodeId, bucket_id: i64, doc: u16) -> Result<&mut PeerState, StoreError> {
        match self.states.entry((*peer, bucket_id, doc)) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let saved: Option<Vec<u8>> = conn
                    .query_row("SELECT state FROM mesh_sync WHERE peer = ?1 AND bucket_id = ?2 AND doc = ?3", params![peer.0, bucket_id, doc], |r| r.get(0))
                    .optional()?;
                Ok(e.insert(saved.map(|s| decode_state(&s)).unwrap_or_default()))
            }
        }
    }

    /// The next sync message for `peer` on document `doc` of bucket `uid`, if any.
    pub fn generate(&mut self, engine: &Engine, peer: &NodeId, uid: &Uid, doc: u16) -> Result<Option<Vec<u8>>> {
        let Some(bucket) = engine.bucket_by_uid(uid)? else { return Ok(None) };
        let conn = engine.tree().conn();
        self.doc(conn, bucket.id, doc)?;
        self.state(conn, peer, bucket.id, doc)?;
        let state = self.states.get_mut(&(*peer, bucket.id, doc)).expect("loaded");
        let d = self.docs.get_mut(&(bucket.id, doc)).expect("loaded");
        Ok(d.generate(state))
    }

    /// Applies `msg` from `peer` to document `doc` of bucket `uid` (the caller has checked
    /// that `peer` is a member), and what it added to the tree, in one transaction: reads and
    /// checks it ([`check_message`]) then [`Mesh::receive_checked`].
    pub fn receive(&mut self, engine: &mut Engine, peer: &NodeId, uid: &Uid, doc: u16, msg: &[u8]) -> Result<Received> {
        let checked = check_message(uid, doc, msg).map_err(|e| refused_whole(peer, e))?;
        self.receive_checked(engine, peer, uid, doc, checked)
    }

    /// Applies a message already read and checked (by the session, off this thread).
    pub fn receive_checked(&mut self, engine: &mut Engine, peer: &NodeId, uid: &Uid, doc: u16, checked: CheckedMessage) -> Result<Received> {
        let bucket = engine.bucket_by_uid(uid)?.ok_or_else(|| invalid(format!("no bucket {uid} here")))?;
        // The genesis of an epoch holds what compaction kept of operations long applied
        // everywhere, not whole (`proto::compaction`): its versions go in as they come, and
        // a receiver knows them by the genesis's actor.
        let (epoch, genesis) = {
            let conn = engine.tree().conn();
            self.doc(conn, bucket.id, doc)?;
            self.state(conn, peer, bucket.id, doc)?;
            let row = self.epoch_row(conn, bucket.id)?;
            (row.epoch, row.base.as_ref().filter(|_| doc != META_DOC).map(|b| b.genesis_actor(uid, doc).to_vec()))
        };
        let state = self.states.get_mut(&(*peer, bucket.id, doc)).expect("loaded");
        let d = self.docs.get_mut(&(bucket.id, doc)).expect("loaded");
        let heads_before = d.heads();
        let added = match d.receive_checked(state, checked) {
            Ok(a) => a,
            Err(DocError::Refused(why)) => {
                // Nothing of it reached the document.
                return Err(refused_whole(peer, why).into());
            }
            Err(e) => {
                // Whatever automerge kept of a bad message is not in the database: start over
                // from what is.
                self.docs.remove(&(bucket.id, doc));
                return Err(invalid(format!("a sync message from {} was refused: {e}", peer.short())).into());
            }
        };
        if added.is_empty() && d.heads() == heads_before {
            // It brought nothing: no transaction, only perhaps an answer.
            return Ok(Received { answer: d.answer(state), epoch, ..Received::default() });
        }
        // Every entry was checked as it arrived (`check_message`; automerge may apply a change
        // later, once what it depends on is here): read them.
        let mut received = Received { entries: added.len(), epoch, ..Received::default() };
        let mut changes: Vec<Change> = Vec::new();
        let mut meta: Vec<MetaEntry> = Vec::new();
        for (key, value) in &added {
            let Ok(sealed) = signed::open(value) else { continue };
            if doc == META_DOC {
                meta.extend(MetaEntry::decode(key, sealed.body).ok());
            } else if let Ok(mut change) = rules::decode(sealed.body) {
                if genesis.is_some() && self.docs.get_mut(&(bucket.id, doc)).and_then(|d| d.author_of(key)) == genesis {
                    change.commit = None;
                }
                changes.push(change);
            }
        }
        received.members_changed = meta.iter().any(|e| matches!(e, MetaEntry::Member { .. } | MetaEntry::Grant { .. } | MetaEntry::Policy { .. } | MetaEntry::Removed { .. }));
        if received.members_changed {
            self.members.remove(&bucket.id);
        }
        let members = self.membership(engine.tree().conn(), bucket.id)?;
        let (me, members_changed) = (self.me, received.members_changed);
        let (now, bound) = (engine.now_ms(), engine.tree().clock_bound());
        // A branch record may release changes that waited for it (applied in this same
        // transaction, so not counted here): then the ids are not known in advance.
        // Versions held from earlier messages may be released with these (see whole_commits):
        // at most all that the bucket holds.
        let held: u64 = if changes.iter().any(|c| c.commit.is_some_and(|k| k.len > 1)) {
            let n: i64 = engine.tree().conn().query_row("SELECT count(*) FROM mesh_held WHERE bucket_id = ?1", [bucket.id], |r| r.get(0)).map_err(StoreError::from)?;
            n.max(0) as u64
        } else {
            0
        };
        let branches_arrived = meta.iter().any(|e| matches!(e, MetaEntry::Branch(_)));
        if branches_arrived {
            // A record whose parent was not known when it came stays in the document,
            // unapplied; any record arriving now may be that parent. So every record of the
            // document not yet in the tree is tried again (parents first: `apply_meta`).
            let known: HashSet<Uid> = meta.iter().filter_map(|e| if let MetaEntry::Branch(b) = e { Some(b.uid) } else { None }).collect();
            let conn = engine.tree().conn();
            let earlier: Vec<MetaEntry> = meta_entries(self.doc(conn, bucket.id, META_DOC)?)
                .into_iter()
                .filter_map(|e| match e {
                    MetaEntry::Branch(b) if !known.contains(&b.uid) => Some(b),
                    _ => None,
                })
                .filter(|b| matches!(crate::store::replica::branch_by_uid(conn, bucket.id, &b.uid), Ok(None)))
                .map(MetaEntry::Branch)
                .collect();
            meta.extend(earlier);
        }
        // Each version may leave its ancestors and itself to repair (`store::shape`), and
        // each branch a repair event.
        let repairs_max = |depth: usize| depth as u64 + 2;
        let ids = if branches_arrived || members_changed {
            Ids::Unbounded
        } else {
            Ids::AtMost(changes.iter().map(|c| repairs_max(c.path.ancestors().len()) + 1).sum::<u64>() + meta.len() as u64 + held * repairs_max(crate::proto::limits::PATH_DEPTH_MAX))
        };
        let touched = HashSet::from([(bucket.id, doc)]);
        let result = engine.tree_mut().transact(ids, now, |tx| -> Result<Applied, StoreError> {
            self.persist(tx, bucket.id, doc)?;
            apply_meta(tx, bucket.id, &meta, &members)?;
            let admission = Admission { members: &members, me, bound, now };
            let mut applied = take_in(tx, bucket.id, changes, &admission, &mut self.waiting)?;
            if members_changed {
                reconcile_members(tx, bucket.id, &members, &me, now, &mut self.waiting)?;
            }
            if branches_arrived || members_changed {
                // Changes that waited for a branch's record or for their writer's admission
                // (and, if some left the wait, the documents are due to be read again).
                let again = tx.take_deferred(bucket.id, &mut self.waiting)?;
                applied.add(take_in(tx, bucket.id, again, &admission, &mut self.waiting)?);
                tx.rescan_may_help(bucket.id)?;
            }
            Ok(applied)
        });
        match result {
            Ok(applied) => received.applied = applied,
            Err(e) => {
                self.forget(&touched);
                return Err(e.into());
            }
        }
        if let (Some(state), Some(d)) = (self.states.get_mut(&(*peer, bucket.id, doc)), self.docs.get_mut(&(bucket.id, doc))) {
            received.answer = d.answer(state);
        }
        Ok(received)
    }

    /// Takes in what waited and is due, bucket by bucket: peers' versions whose stamps came
    /// within the clock bound (`mesh_future`), operations held past their time (applied as
    /// they stand), and, where versions left the wait and the bucket's members or branches
    /// changed since, the versions its documents hold that are now accepted and missing from
    /// the tree (`store::waiting`). Deferred versions past their time leave the wait. What
    /// this adds is as `receive` reports it.
    pub fn release_due(&mut self, engine: &mut Engine) -> Result<Applied> {
        let (now, bound) = (engine.now_ms(), engine.tree().clock_bound());
        let limit = bound.limit(now);
        let mut buckets: std::collections::BTreeSet<i64> = {
            let conn = engine.tree().conn();
            let mut st = conn.prepare_cached("SELECT DISTINCT bucket_id FROM mesh_future WHERE at_ms <= ?1").map_err(StoreError::from)?;
            let rows = st.query_map([limit], |r| r.get(0)).map_err(StoreError::from)?;
            rows.collect::<std::result::Result<_, _>>().map_err(StoreError::from)?
        };
        buckets.extend(waiting::buckets_due(engine.tree().conn(), now, &self.waiting.bounds)?);
        let mut total = Applied::default();
        for bucket_id in buckets {
            let members = self.membership(engine.tree().conn(), bucket_id)?;
            let me = self.me;
            let rescan = if waiting::rescan_due(engine.tree().conn(), bucket_id, now, &self.waiting.bounds)? { Some(self.missing_versions(engine.tree().conn(), bucket_id, &members)?) } else { None };
            let applied = engine.tree_mut().transact(Ids::Unbounded, now, |tx| -> Result<Applied, StoreError> {
                let due: Vec<Vec<u8>> = {
                    let mut st = tx.conn().prepare_cached("SELECT data FROM mesh_future WHERE bucket_id = ?1 AND at_ms <= ?2")?;
                    let rows = st.query_map(params![bucket_id, limit], |r| r.get(0))?;
                    rows.collect::<std::result::Result<_, _>>()?
                };
                tx.conn().execute("DELETE FROM mesh_future WHERE bucket_id = ?1 AND at_ms <= ?2", params![bucket_id, limit])?;
                let mut changes: Vec<Change> = due.iter().filter_map(|d| rules::decode(d).ok()).collect();
                let released = changes.len();
                changes.extend(tx.expired_held(bucket_id, now, EXPIRED_OPS_PER_TICK, &mut self.waiting)?);
                tx.expire_deferred(bucket_id, now, &mut self.waiting)?;
                if let Some((found, settled)) = &rescan {
                    changes.extend(found.iter().cloned());
                    tx.rescanned(bucket_id, now, *settled)?;
                }
                let admission = Admission { members: &members, me, bound, now };
                let applied = take_in(tx, bucket_id, changes, &admission, &mut self.waiting)?;
                if released > 0 {
                    tracing::info!(versions = released, "versions that waited for the clock bound were taken in");
                }
                Ok(applied)
            })?;
            if let Some((found, _)) = &rescan {
                tracing::info!(bucket = bucket_id, versions = found.len(), applied = applied.inserted, "read the bucket's documents again for versions that had left the wait");
            }
            total.add(applied);
        }
        Ok(total)
    }

    /// The versions bucket `bucket_id`'s documents hold whose writer the membership accepts
    /// and which the tree lacks, with whether that is all the documents hold beyond the tree
    /// (else some still wait for an admission or a branch). Reads every document of the
    /// bucket: run only when versions left the wait (`store::waiting`).
    fn missing_versions(&mut self, conn: &Connection, bucket_id: i64, members: &Membership) -> Result<(Vec<Change>, bool), StoreError> {
        let mut found = Vec::new();
        let mut settled = true;
        for doc in 0..DOCS {
            if doc == META_DOC {
                continue;
            }
            for (_, value) in self.doc(conn, bucket_id, doc)?.entries() {
                let Some(c) = signed::open(&value).ok().and_then(|s| rules::decode(s.body).ok()) else { continue };
                let branch = crate::store::replica::branch_by_uid(conn, bucket_id, &c.branch)?;
                let in_tree = match &branch {
                    Some(b) => crate::store::replica::has_version(conn, b.id, &c.path, &c.key)?,
                    None => false,
                };
                if in_tree {
                    continue;
                }
                if branch.is_some() && (c.id().node == self.me || members.accepts(&c.id())) {
                    found.push(c);
                } else {
                    settled = false;
                }
            }
        }
        Ok((found, settled))
    }

    /// Saves what `peer` and this node agreed on every document, for the next session, and
    /// forgets the in-flight rest.
    pub fn end_session(&mut self, engine: &mut Engine, peer: &NodeId) -> Result<()> {
        self.peer_summaries.retain(|(p, _), _| p != peer);
        let keys: Vec<(NodeId, i64, u16)> = self.states.keys().filter(|(p, _, _)| p == peer).copied().collect();
        let saved: Vec<(i64, u16, Vec<u8>)> = keys.iter().filter_map(|k| self.states.remove(k).map(|s| (k.1, k.2, encode_state(&s)))).collect();
        let now = engine.now_ms();
        engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
            // Kept only for buckets the peer is still a member of: a removed member's states
            // went with its removal and are not written back.
            let mut save = tx.conn().prepare_cached(
                "INSERT INTO mesh_sync(peer, bucket_id, doc, state)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM mesh_member WHERE bucket_id = ?2 AND node = ?1 AND removed_ms IS NULL)
                 ON CONFLICT(peer, bucket_id, doc) DO UPDATE SET state = excluded.state",
            )?;
            for (bucket_id, doc, state) in &saved {
                save.execute(params![peer.0, bucket_id, doc, state])?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// The error for a message refused before anything of it was applied.
fn refused_whole(peer: &NodeId, why: impl std::fmt::Display) -> StoreError {
    invalid(format!("a sync message from {} was refused whole: {why}", peer.short()))
}

/// Reads a peer's sync message for document `doc` of `bucket` and checks every entry it sets
/// ([`check_entries`]). Needs neither the store nor the document, so a session runs it on
/// its own thread (signatures cost ~50 µs each) and hands the store only what passed.
pub fn check_message(bucket: &Uid, doc: u16, msg: &[u8]) -> std::result::Result<CheckedMessage, String> {
    CheckedMessage::read(msg, |entries| check_entries(bucket, doc, entries)).map_err(|e| e.to_string())
}

/// The check every entry of a peer's sync message passes before anything of the message is
/// applied: a signed value (`proto::signed`) whose body decodes within bounds, filed under the
/// key its fields make (and a version in its shard), signed by the node that writes that key
/// (a version's own writer; the adder, granter, remover, deleter; a node for its addresses; a
/// branch's creator), with a signature that holds. One entry that fails refuses the message.
fn check_entries(bucket: &Uid, doc: u16, fresh: &[(String, Vec<u8>)]) -> std::result::Result<(), String> {
    let mut sealed = Vec::with_capacity(fresh.len());
    for (key, value) in fresh {
        let s = signed::open(value).map_err(|e| format!("entry {key}: {e} (the peer may run an older protocol)"))?;
        let writer_ok = if doc == META_DOC {
            let e = MetaEntry::decode(key, s.body).map_err(|e| e.to_string())?;
            e.written_by(&s.signer)
        } else {
            let c = rules::decode(s.body).map_err(|e| format!("entry {key}: {e}"))?;
            if rules::doc_key(&c.id()) != *key || rules::shard_of(&c.branch, &c.path) != doc {
                return Err(format!("a version filed under the wrong key or shard: {key}"));
            }
            c.id().node == s.signer
        };
        if !writer_ok {
            return Err(format!("entry {key} signed by {}, who does not write it", s.signer.short()));
        }
        sealed.push((key.as_str(), s));
    }
    signed::verify(bucket, &sealed).map_err(|i| format!("entry {}: {}", sealed[i].0, signed::SignedError::Signature(sealed[i].1.signer.short())))
}

/// The entries of a bucket's document (all checked when they arrived, or written here).
pub(super) fn meta_entries(doc: &ReplicaDoc) -> Vec<MetaEntry> {
    doc.entries().into_iter().filter_map(|(k, v)| MetaEntry::decode(&k, signed::open(&v).ok()?.body).ok()).collect()
}

/// The addresses `node` last put in a bucket's document.
fn latest_addrs(doc: &ReplicaDoc, node: &NodeId) -> Option<Vec<SocketAddr>> {
    let prefix = format!("addr/{}/", node.to_hex());
    let (key, value) = doc.entries().into_iter().filter(|(k, _)| k.starts_with(&prefix)).max_by(|a, b| a.0.cmp(&b.0))?;
    match MetaEntry::decode(&key, signed::open(&value).ok()?.body).ok()? {
        MetaEntry::Addrs { addrs, .. } => Some(addrs),
        _ => None,
    }
}

/// Splits changes from peers into those whose writer the bucket's membership accepts and
/// those that wait. This node's own versions (coming back after a power loss) are always
/// taken: it keeps what it wrote whatever it hears.
fn accepted_changes(changes: Vec<Change>, members: &Membership, me: &NodeId) -> (Vec<Change>, Vec<Change>) {
    changes.into_iter().partition(|c| c.id().node == *me || members.accepts(&c.id()))
}

/// What changes from peers are taken in against: the bucket's membership, this node, the
/// clock bound and the time.
struct Admission<'a> {
    members: &'a Membership,
    me: NodeId,
    bound: Bound,
    now: i64,
}

/// Most operations applied as they stand in one tick (the rest at the next ones).
const EXPIRED_OPS_PER_TICK: usize = 256;

/// Takes changes from peers into bucket `bucket_id` through every wait: a writer the bucket
/// does not accept (yet: an admission may still be on its way) or a branch not known yet →
/// `mesh_deferred`; an operation not wholly here → `mesh_held`; a stamp beyond the clock
/// bound → `mesh_future`. The rest is applied.
fn take_in(tx: &mut Tx<'_>, bucket_id: i64, changes: Vec<Change>, a: &Admission<'_>, w: &mut Waiting) -> Result<Applied, StoreError> {
    let (accepted, waiting) = accepted_changes(changes, a.members, &a.me);
    tx.defer(bucket_id, &waiting, a.now, w)?;
    let whole = tx.whole_commits(bucket_id, accepted, a.now, w)?;
    let ready = hold_ahead(tx, bucket_id, whole, a.bound, a.now, &a.me)?;
    let mut applied = tx.apply_changes(bucket_id, ready)?;
    tx.defer(bucket_id, &applied.deferred, a.now, w)?;
    applied.deferred.clear();
    Ok(applied)
}

/// Keeps the changes stamped beyond the clock bound in `mesh_future`, by stamp, and returns
/// the rest. This node's own versions (coming back after a power loss) are never held.
fn hold_ahead(tx: &mut Tx<'_>, bucket_id: i64, changes: Vec<Change>, bound: Bound, now: i64, me: &NodeId) -> Result<Vec<Change>, StoreError> {
    // An operation waits whole: one version of it ahead holds all of it (a rename must not
    // arrive as its tombstone alone).
    let ahead_ops: HashSet<(NodeId, i64)> = changes.iter().filter(|c| c.id().node != *me && !bound.within(c.key.stamp(), now)).filter_map(|c| c.commit.map(|k| (c.id().node, k.first_seq))).collect();
    let (ready, ahead): (Vec<Change>, Vec<Change>) = changes
        .into_iter()
        .partition(|c| c.id().node == *me || (bound.within(c.key.stamp(), now) && !c.commit.is_some_and(|k| ahead_ops.contains(&(c.id().node, k.first_seq)))));
    for c in &ahead {
        tx.conn()
            .prepare_cached("INSERT INTO mesh_future(bucket_id, writer, at_ms, data) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![bucket_id, c.id().node.0.to_vec(), c.key.stamp().ms, rules::encode(c)])?;
    }
    if let Some(c) = ahead.first() {
        tracing::warn!(
            writer = %c.id().node.short(),
            versions = ahead.len(),
            ahead_s = (c.key.stamp().ms - now) / 1000,
            "versions stamped beyond the clock bound wait until their time (the writer's clock is ahead: see alkfs status)"
        );
    }
    Ok(ready)
}

/// Brings what the network side consults (`mesh_member.removed_ms`: refused on every
/// protocol) and the tree in line with the bucket's membership: a node that is not a member
/// by the rule is cut off, and its versions past what the rule accepts are taken back out of
/// the tree into `mesh_deferred` (`cut_seq` records how far, so this runs once per change of
/// the bound); this node's own versions stay. Deferred versions the rule now accepts are the
/// caller's to apply.
fn reconcile_members(tx: &mut Tx<'_>, bucket_id: i64, members: &Membership, me: &NodeId, now: i64, w: &mut Waiting) -> Result<(), StoreError> {
    tx.conn()
        .prepare_cached("INSERT INTO mesh_policy(bucket_id, members_invite) VALUES (?1, ?2) ON CONFLICT(bucket_id) DO UPDATE SET members_invite = excluded.members_invite")?
        .execute(params![bucket_id, members.members_invite()])?;
    for node in members.nodes() {
        let row: Option<(Option<i64>, Option<i64>)> = tx
            .conn()
            .prepare_cached("SELECT removed_ms, cut_seq FROM mesh_member WHERE bucket_id = ?1 AND node = ?2")?
            .query_row(params![bucket_id, node.0], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let member = members.is_member(&node);
        if !member && row.is_none() {
            // Named by an entry without effect (an admission nobody could make): not listed.
            continue;
        }
        let removed_ms = match row {
            _ if member => None,
            Some((Some(at), _)) => Some(at),
            _ => Some(now),
        };
        if !member {
            // A departed peer's sync states go with it.
            tx.conn().prepare_cached("DELETE FROM mesh_sync WHERE peer = ?1 AND bucket_id = ?2")?.execute(params![node.0, bucket_id])?;
        }
        let cut = if node == *me { None } else { members.cutoff(&node) };
        let role = members.role(&node).map(Role::as_str);
        tx.conn()
            .prepare_cached(
                "INSERT INTO mesh_member(bucket_id, node, added_ms, removed_ms, cut_seq, role) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(bucket_id, node) DO UPDATE SET removed_ms = excluded.removed_ms, cut_seq = excluded.cut_seq, role = COALESCE(excluded.role, role)",
            )?
            .execute(params![bucket_id, node.0, now, removed_ms, cut, role])?;
        let before = row.and_then(|(_, c)| c);
        if let Some(above) = cut.filter(|c| before.is_none_or(|b| *c < b)) {
            let out = tx.retract_versions(bucket_id, &node, above)?;
            if !out.is_empty() {
                tracing::info!(node = %node.short(), versions = out.len(), above_seq = above, "took back versions the bucket's membership no longer accepts");
            }
            tx.defer(bucket_id, &out, now, w)?;
        }
    }
    Ok(())
}

fn apply_meta(tx: &mut Tx<'_>, bucket_id: i64, entries: &[MetaEntry], members: &Membership) -> Result<(), StoreError> {
    // Parents before children, whatever order the records came in; those whose parent is
    // still unknown wait in the document (they are applied when it arrives: every receive
    // re-reads the branch records below).
    let mut pending: Vec<&BranchRecord> = entries.iter().filter_map(|e| if let MetaEntry::Branch(b) = e { Some(b) } else { None }).collect();
    loop {
        let before = pending.len();
        let mut left = Vec::new();
        for rec in pending {
            if !tx.apply_branch(bucket_id, rec)? {
                left.push(rec);
            }
        }
        pending = left;
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    for rec in pending {
        tracing::warn!(branch = %rec.name, "a branch's parent has not arrived yet; it is applied when it does");
    }
    for e in entries {
        let conn = tx.conn();
        match e {
            // An admission by a node that may not admit has no effect, and no row.
            MetaEntry::Member { node, added_by, at_ms, .. } if members.is_member(node) => {
                conn.execute(
                    "INSERT OR IGNORE INTO mesh_member(bucket_id, node, added_ms, added_by) VALUES (?1, ?2, ?3, ?4)",
                    params![bucket_id, node.0, at_ms, added_by.0],
                )?;
            }
            MetaEntry::Removed { node, at_ms, .. } => {
                conn.execute(
                    "INSERT INTO mesh_member(bucket_id, node, added_ms, removed_ms) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT(bucket_id, node) DO UPDATE SET removed_ms = COALESCE(removed_ms, excluded.removed_ms)",
                    params![bucket_id, node.0, at_ms],
                )?;
            }
            MetaEntry::Addrs { node, at_ms, addrs } => {
                // The latest a node said (a joiner reads all of them at once, in any order);
                // what a session's handshake said since is newer.
                let newer: bool = conn
                    .query_row("SELECT updated_ms < ?2 FROM mesh_addr WHERE node = ?1", params![node.0, at_ms], |r| r.get(0))
                    .optional()?
                    .unwrap_or(true);
                if newer {
                    record_addrs(conn, node, addrs, *at_ms)?;
                }
            }
            MetaEntry::Member { .. } | MetaEntry::Grant { .. } | MetaEntry::Policy { .. } => {}
            MetaEntry::BranchDeleted { uid, .. } => {
                if let Some(b) = crate::store::replica::branch_by_uid(tx.conn(), bucket_id, uid)? {
                    if b.parent_id.is_some() {
                        let seq = tx.next_seq();
                        if tx.conn().execute("UPDATE branch SET deleted_seq = ?1 WHERE id = ?2 AND deleted_seq IS NULL", params![seq, b.id])? > 0 {
                            tx.emit(crate::store::outbox::Event::branch_op("branch-delete", &b, seq));
                        }
                    }
                }
            }
            MetaEntry::Branch(_) => {}
        }
    }
    Ok(())
}

fn record_addrs(conn: &Connection, node: &NodeId, addrs: &[SocketAddr], now: i64) -> Result<(), StoreError> {
    let text = serde_json::to_string(addrs).expect("addresses serialise");
    conn.execute(
        "INSERT INTO mesh_addr(node, addrs, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(node) DO UPDATE SET addrs = excluded.addrs, updated_ms = excluded.updated_ms",
        params![node.0, text, now],
    )?;
    Ok(())
}

fn bucket_uids(conn: &Connection) -> Result<HashMap<i64, Uid>, StoreError> {
    let mut st = conn.prepare_cached("SELECT id, uid FROM bucket")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (id, uid) = row?;
        if let Some(uid) = Uid::from_bytes(&uid) {
            out.insert(id, uid);
        }
    }
    Ok(out)
}

/// The largest seq of `node`'s versions this store holds in bucket `bucket_id` (0: none).
fn last_seq_of(conn: &Connection, bucket_id: i64, node: &NodeId) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT coalesce(max(vseq), 0) FROM version WHERE substr(vkey, 13, 32) = ?1 AND branch_id IN (SELECT id FROM branch WHERE bucket_id = ?2)",
        params![node.0.to_vec(), bucket_id],
        |r| r.get(0),
    )?)
}

/// The identity of bucket `id`.
pub(super) fn bucket_uid(conn: &Connection, id: i64) -> Result<Uid, StoreError> {
    let bytes: Vec<u8> = conn.query_row("SELECT uid FROM bucket WHERE id = ?1", [id], |r| r.get(0))?;
    Uid::from_bytes(&bytes).ok_or_else(|| invalid(format!("bucket {id} has a damaged identity")))
}

fn bucket_name(conn: &Connection, id: i64) -> Result<String, StoreError> {
    Ok(conn.query_row("SELECT name FROM bucket WHERE id = ?1", [id], |r| r.get(0))?)
}

/// Buckets this node shares (it has recorded itself as a member).
pub fn shared_bucket_ids(conn: &Connection) -> Result<HashSet<i64>, StoreError> {
    let mut st = conn.prepare_cached("SELECT DISTINCT bucket_id FROM mesh_member WHERE node = (SELECT self_node FROM clock WHERE id = 0)")?;
    let rows = st.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The members of bucket `bucket_id`, removed ones included (with when).
pub fn members(conn: &Connection, bucket_id: i64) -> Result<Vec<Member>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT m.node, m.added_ms, m.added_by, m.removed_ms, a.addrs, m.role FROM mesh_member m LEFT JOIN mesh_addr a ON a.node = m.node
         WHERE m.bucket_id = ?1 ORDER BY m.added_ms, m.node",
    )?;
    let rows = st.query_map([bucket_id], |r| {
        Ok(((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<Vec<u8>>>(2)?, r.get::<_, Option<i64>>(3)?, r.get::<_, Option<String>>(4)?), r.get::<_, Option<String>>(5)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let ((node, added_ms, by, removed_ms, addrs), role) = row?;
        let Ok(node) = <[u8; 32]>::try_from(node) else { continue };
        out.push(Member {
            node: NodeId(node),
            added_ms,
            added_by: by.and_then(|b| <[u8; 32]>::try_from(b).ok()).map(NodeId),
            removed_ms,
            addrs: addrs.and_then(|a| serde_json::from_str(&a).ok()).unwrap_or_default(),
            role: role.as_deref().and_then(Role::parse),
        });
    }
    Ok(out)
}

/// Whether writers of bucket `bucket_id` may invite, as this node last read its document.
pub fn members_invite(conn: &Connection, bucket_id: i64) -> Result<bool, StoreError> {
    Ok(conn.query_row("SELECT members_invite FROM mesh_policy WHERE bucket_id = ?1", [bucket_id], |r| r.get(0)).optional()?.unwrap_or(false))
}

/// The role of `node` in bucket `bucket_id` as this node last read it (`None`: not a member,
/// or not known yet).
pub fn role_of(conn: &Connection, bucket_id: i64, node: &NodeId) -> Result<Option<Role>, StoreError> {
    let role: Option<Option<String>> = conn
        .query_row("SELECT role FROM mesh_member WHERE bucket_id = ?1 AND node = ?2 AND removed_ms IS NULL", params![bucket_id, node.0], |r| r.get(0))
        .optional()?;
    Ok(role.flatten().as_deref().and_then(Role::parse))
}

/// The buckets (uids) of which `node` is a member here, not removed: what it may sync, and
/// whose blobs it may fetch.
pub fn buckets_of(conn: &Connection, node: &NodeId) -> Result<Vec<(i64, Uid)>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT b.id, b.uid FROM mesh_member m JOIN bucket b ON b.id = m.bucket_id WHERE m.node = ?1 AND m.removed_ms IS NULL",
    )?;
    let rows = st.query_map([node.0], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, uid) = row?;
        if let Some(uid) = Uid::from_bytes(&uid) {
            out.push((id, uid));
        }
    }
    Ok(out)
}

/// Whether `joiner` may join bucket `uid` with `secret` at `now_ms`, read only: the
/// invitation's terms after this use, or why not. (The store's `admit` decides again in the
/// transaction that uses the invitation; the network gate asks first, off the store's
/// thread, so a stranger's guess costs the writer nothing.)
pub fn admissible(conn: &Connection, uid: &Uid, secret: &[u8; SECRET_BYTES], joiner: &NodeId, now_ms: i64) -> Result<std::result::Result<InviteTerms, JoinRefusal>, StoreError> {
    let Some(bucket_id) = conn.query_row("SELECT id FROM bucket WHERE uid = ?1", [uid.0], |r| r.get::<_, i64>(0)).optional()? else {
        return Ok(Err(JoinRefusal::UnknownSecret));
    };
    let hash = blake3::hash(secret).as_bytes().to_vec();
    let terms: Option<InviteTerms> = conn
        .query_row("SELECT expires_ms, uses_left FROM mesh_invite WHERE secret_hash = ?1 AND bucket_id = ?2", params![hash, bucket_id], |r| {
            Ok(InviteTerms { expires_ms: r.get(0)?, uses_left: r.get(1)? })
        })
        .optional()?;
    let after = match admit(terms, now_ms) {
        Ok(t) => t,
        Err(why) => return Ok(Err(why)),
    };
    let removed: bool = conn
        .query_row("SELECT removed_ms IS NOT NULL FROM mesh_member WHERE bucket_id = ?1 AND node = ?2", params![bucket_id, joiner.0], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    if removed {
        return Ok(Err(JoinRefusal::Removed));
    }
    Ok(Ok(after))
}

/// The buckets among `asked` (every one, when empty) this node shares and `peer` is a member
/// of, not removed.
pub fn shared_with(conn: &Connection, peer: &NodeId, asked: &[Uid]) -> Result<Vec<Uid>, StoreError> {
    let mine = shared_bucket_ids(conn)?;
    Ok(buckets_of(conn, peer)?.into_iter().filter(|(id, uid)| mine.contains(id) && (asked.is_empty() || asked.contains(uid))).map(|(_, u)| u).collect())
}

/// Every other node this one shares a bucket with (not removed), with its addresses.
pub fn peers(conn: &Connection) -> Result<Vec<(NodeId, Vec<SocketAddr>)>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT DISTINCT m.node, a.addrs FROM mesh_member m LEFT JOIN mesh_addr a ON a.node = m.node
         WHERE m.removed_ms IS NULL AND m.node != (SELECT self_node FROM clock WHERE id = 0)
           AND m.bucket_id IN (SELECT bucket_id FROM mesh_member WHERE node = (SELECT self_node FROM clock WHERE id = 0) AND removed_ms IS NULL)",
    )?;
    let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<String>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (node, addrs) = row?;
        let Ok(node) = <[u8; 32]>::try_from(node) else { continue };
        out.push((NodeId(node), addrs.and_then(|a| serde_json::from_str(&a).ok()).unwrap_or_default()));
    }
    Ok(out)
}

/// Whether `peer` may fetch blob `hash`: some version in a bucket it is a member of names it.
pub fn may_fetch(conn: &Connection, peer: &NodeId, hash: &crate::proto::entry::ContentHash) -> Result<bool, StoreError> {
    // The hash came into one of the peer's buckets by a write of this node there (a version
    // whose writer, in its order key, is this node), or by a fetch from that bucket's members.
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM bucket_blob WHERE hash = ?1
               AND bucket_id IN (SELECT bucket_id FROM mesh_member WHERE node = ?2 AND removed_ms IS NULL)
             UNION ALL
             SELECT 1 FROM version v JOIN branch b ON b.id = v.branch_id
             WHERE v.hash = ?1 AND substr(v.vkey, 13, 32) = (SELECT self_node FROM clock WHERE id = 0)
               AND b.bucket_id IN (SELECT bucket_id FROM mesh_member WHERE node = ?2 AND removed_ms IS NULL)
             LIMIT 1",
        )?
        .query_row(params![hash.0.to_vec(), peer.0], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Versions of one writer waiting for their stamps to come within the clock bound.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockWait {
    /// The writer whose clock is ahead (hex node id).
    pub writer: String,
    /// Its versions waiting here.
    pub versions: u64,
    /// How far ahead of this node's clock its latest stamp is, in ms.
    pub ahead_ms: i64,
}

/// What waits for the clock bound here, by writer.
pub fn clock_waits(conn: &Connection, now_ms: i64) -> Result<Vec<ClockWait>, StoreError> {
    let mut st = conn.prepare_cached("SELECT writer, count(*), max(at_ms) FROM mesh_future GROUP BY writer ORDER BY writer")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (writer, n, at) = row?;
        let writer = <[u8; 32]>::try_from(writer.as_slice()).map(|b| NodeId(b).to_hex()).unwrap_or_else(|_| "?".into());
        out.push(ClockWait { writer, versions: n.max(0) as u64, ahead_ms: at.saturating_sub(now_ms) });
    }
    Ok(out)
}

/// A request to the store's half of the mesh, run by the node's writer (the one owner of the
/// documents and of the database's write side).
#[derive(Debug)]
pub enum MeshOp {
    /// Publish committed local changes.
    Publish,
    /// Record where this node listens, in every shared bucket.
    AnnounceAddrs(Vec<SocketAddr>),
    /// Make an invitation to a bucket.
    Invite {
        /// The bucket.
        bucket: String,
        /// Valid for this long.
        expires_ms: i64,
        /// This many joins.
        uses: u32,
        /// The role they join with.
        role: Role,
        /// Where this node listens.
        addrs: Vec<SocketAddr>,
    },
    /// Admit a joiner.
    Admit {
        /// The bucket.
        bucket: Uid,
        /// The ticket's secret.
        secret: [u8; SECRET_BYTES],
        /// The joiner.
        joiner: NodeId,
        /// Where it listens.
        addrs: Vec<SocketAddr>,
    },
    /// Adopt a bucket this node was admitted to.
    Adopt(Box<Adoption>),
    /// Remove a member.
    Remove {
        /// The bucket.
        bucket: String,
        /// The member.
        node: NodeId,
    },
    /// Give a member a role.
    Grant {
        /// The bucket.
        bucket: String,
        /// The member.
        node: NodeId,
        /// Its role from now on.
        role: Role,
    },
    /// Say who may invite to a bucket.
    InvitePolicy {
        /// The bucket.
        bucket: String,
        /// Writers too (else only owners).
        members_invite: bool,
    },
    /// Digests of a bucket's documents, and the epoch of its shards.
    Summary(Uid),
    /// A peer's summary of a bucket: the documents that differ ([`Mesh::compare`]), or that
    /// its epoch is not this node's.
    Compare {
        /// The peer.
        peer: NodeId,
        /// The bucket.
        bucket: Uid,
        /// Its epoch.
        epoch: u32,
        /// Its digests.
        digests: Vec<u64>,
    },
    /// A peer announced an epoch of a bucket's shards ([`Mesh::take_epoch`]).
    TakeEpoch {
        /// The bucket.
        bucket: Uid,
        /// The epoch.
        base: crate::proto::compaction::EpochBase,
    },
    /// Each shared bucket's epoch, for `status`.
    Epochs,
    /// Compact the shared buckets that are due ([`Mesh::compact_due`]).
    CompactDue {
        /// Peers with a session now.
        connected: Vec<NodeId>,
        /// Members to wait for though they have no session (they had one lately).
        waited: Vec<NodeId>,
    },
    /// The next sync message for a peer.
    Generate {
        /// The peer.
        peer: NodeId,
        /// The bucket.
        bucket: Uid,
        /// The document.
        doc: u16,
    },
    /// A sync message from a peer.
    Receive {
        /// The peer.
        peer: NodeId,
        /// The bucket.
        bucket: Uid,
        /// The document.
        doc: u16,
        /// The epoch the message is of (a shard's, of another epoch, is not applied).
        epoch: u32,
        /// The message, read and checked by the session ([`check_message`]).
        msg: CheckedMessage,
    },
    /// A session with a peer ended.
    EndSession(NodeId),
    /// Buckets `peer` is a member of here, among `asked`.
    Accept {
        /// The peer.
        peer: NodeId,
        /// What it asked for (empty: every bucket it is a member of).
        asked: Vec<Uid>,
    },
    /// The other members of shared buckets, with their addresses.
    Peers,
    /// Blobs replicated versions name whose bytes are not here (at most this many).
    Missing(usize),
    /// Shared buckets and their other members (not removed).
    Shared,
    /// The bytes of blobs arrived (inline ones carry them; larger ones are in place, tagged
    /// and referenced by the iroh-blobs store), all recorded in one transaction. Inline ones
    /// are left for the blob actor to index (tag) in a quiet moment.
    BlobsArrived(NodeId, Vec<(crate::proto::entry::ContentHash, Option<Vec<u8>>)>),
    /// Take in what waited and is due ([`Mesh::release_due`]), and say what still waits for
    /// the clock and which bounds on waiting were hit ([`MeshReply::ClockWaits`]).
    ReleaseDue,
}

/// What a joiner adopts.
#[derive(Debug)]
pub struct Adoption {
    /// The local name.
    pub name: String,
    /// The bucket.
    pub bucket: Uid,
    /// Its root branch.
    pub root: BranchRecord,
    /// The inviter.
    pub inviter: NodeId,
    /// Where it listens.
    pub inviter_addrs: Vec<SocketAddr>,
    /// Where this node listens.
    pub my_addrs: Vec<SocketAddr>,
}

/// The answer to a [`MeshOp`].
#[derive(Debug)]
pub enum MeshReply {
    /// Documents changed.
    Changed(Vec<(Uid, u16)>),
    /// An invitation.
    Invited(Uid, [u8; SECRET_BYTES]),
    /// An admission, or why not.
    Admitted(std::result::Result<(String, BranchRecord), JoinRefusal>),
    /// The adopted bucket.
    Adopted(BucketIdentity),
    /// A removal from bucket (uid).
    MemberChanged(Uid),
    /// The epoch of a bucket's shards and the digests of its documents.
    Summary(u32, Vec<u64>),
    /// Documents that differ, and whether to send this node's summary back (a peer's
    /// summaries say whether it is in step for compaction: the side that did not dial sends
    /// its own back while the bucket is due one).
    Differing(Vec<u16>, bool),
    /// The peer's shards are of an earlier epoch: this one is to be announced to it.
    PeerBehind(crate::proto::compaction::EpochBase),
    /// The peer's shards are of a later epoch: it announces it.
    PeerAhead,
    /// How an announced epoch was taken.
    Taken(super::compaction::TakenEpoch),
    /// Each shared bucket's epoch.
    Epochs(Vec<super::compaction::BucketEpoch>),
    /// Buckets compacted, with their new epochs to announce.
    Compacted(Vec<(Uid, crate::proto::compaction::EpochBase)>),
    /// A sync message, if any, and the epoch it is of.
    Message(Option<Vec<u8>>, u32),
    /// What a received message did.
    Received(Box<Received>),
    /// Buckets.
    Buckets(Vec<Uid>),
    /// Peers.
    Peers(Vec<(NodeId, Vec<SocketAddr>)>),
    /// Blobs whose bytes are not here (hash, size).
    Blobs(Vec<(crate::proto::entry::ContentHash, u64)>),
    /// What a release applied (blobs it names that are missing), what still waits for the
    /// clock, and the bounds on waiting hit since the last release.
    ClockWaits(Vec<(crate::proto::entry::ContentHash, u64)>, Vec<ClockWait>, Vec<WaitHit>),
    /// Shared buckets with their other members.
    Shared(Vec<(Uid, Vec<NodeId>)>),
    /// Done.
    Done,
}

impl Mesh {
    /// Runs one request, then keeps the documents in memory to their budget.
    pub fn run(&mut self, engine: &mut Engine, op: MeshOp) -> Result<MeshReply> {
        let reply = self.run_op(engine, op);
        self.trim();
        reply
    }

    fn run_op(&mut self, engine: &mut Engine, op: MeshOp) -> Result<MeshReply> {
        Ok(match op {
            MeshOp::Publish => MeshReply::Changed(self.publish(engine)?.changed),
            MeshOp::AnnounceAddrs(addrs) => MeshReply::Changed(self.announce_addrs(engine, &addrs)?),
            MeshOp::Invite { bucket, expires_ms, uses, role, addrs } => {
                let (uid, secret) = self.invite(engine, &bucket, (expires_ms, uses, role), &addrs)?;
                MeshReply::Invited(uid, secret)
            }
            MeshOp::Admit { bucket, secret, joiner, addrs } => MeshReply::Admitted(self.admit(engine, &bucket, &secret, &joiner, &addrs)?),
            MeshOp::Adopt(a) => MeshReply::Adopted(self.adopt(engine, &a)?),
            MeshOp::Remove { bucket, node } => MeshReply::MemberChanged(self.remove_member(engine, &bucket, &node)?),
            MeshOp::Grant { bucket, node, role } => MeshReply::MemberChanged(self.grant_role(engine, &bucket, &node, role)?),
            MeshOp::InvitePolicy { bucket, members_invite } => MeshReply::MemberChanged(self.set_invite_policy(engine, &bucket, members_invite)?),
            MeshOp::Summary(uid) => MeshReply::Summary(self.epoch(engine, &uid)?, self.summary(engine, &uid)?),
            MeshOp::Compare { peer, bucket, epoch, digests } => {
                let ours = self.epoch(engine, &bucket)?;
                match epoch.cmp(&ours) {
                    std::cmp::Ordering::Equal => {
                        let differ = self.compare(engine, &peer, &bucket, &digests)?;
                        MeshReply::Differing(differ, self.compaction_due(engine, &bucket)?)
                    }
                    std::cmp::Ordering::Greater => MeshReply::PeerAhead,
                    std::cmp::Ordering::Less => match self.epoch_base(engine, &bucket)? {
                        Some(base) => MeshReply::PeerBehind(base),
                        None => MeshReply::PeerAhead,
                    },
                }
            }
            MeshOp::Epochs => MeshReply::Epochs(super::compaction::epochs(engine.tree().conn())?),
            MeshOp::TakeEpoch { bucket, base } => MeshReply::Taken(self.take_epoch(engine, &bucket, &base)?),
            MeshOp::CompactDue { connected, waited } => MeshReply::Compacted(self.compact_due(engine, &connected, &waited)?),
            MeshOp::Generate { peer, bucket, doc } => MeshReply::Message(self.generate(engine, &peer, &bucket, doc)?, self.epoch(engine, &bucket)?),
            MeshOp::Receive { peer, bucket, doc, epoch, msg } => {
                let ours = self.epoch(engine, &bucket)?;
                if doc != META_DOC && epoch != ours {
                    // A shard of another epoch: the summaries sort the epochs out first.
                    tracing::debug!(peer = %peer.short(), theirs = epoch, ours, "a sync message of another epoch was not applied");
                    MeshReply::Received(Box::new(Received { epoch: ours, ..Received::default() }))
                } else {
                    MeshReply::Received(Box::new(self.receive_checked(engine, &peer, &bucket, doc, msg)?))
                }
            }
            MeshOp::EndSession(peer) => {
                self.end_session(engine, &peer)?;
                MeshReply::Done
            }
            MeshOp::Accept { peer, asked } => MeshReply::Buckets(shared_with(engine.tree().conn(), &peer, &asked)?),
            MeshOp::Peers => MeshReply::Peers(peers(engine.tree().conn())?),
            MeshOp::Shared => {
                let conn = engine.tree().conn();
                let uids = bucket_uids(conn)?;
                let mut out = Vec::new();
                for id in shared_bucket_ids(conn)? {
                    let Some(uid) = uids.get(&id) else { continue };
                    let others = members(conn, id)?.into_iter().filter(|m| m.removed_ms.is_none() && m.node != self.me).map(|m| m.node).collect();
                    out.push((*uid, others));
                }
                MeshReply::Shared(out)
            }
            MeshOp::Missing(limit) => {
                let conn = engine.tree().conn();
                let mut st = conn.prepare_cached("SELECT hash, size FROM blob WHERE present = 0 LIMIT ?1").map_err(StoreError::from)?;
                let rows = st
                    .query_map([limit as i64], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(StoreError::from)?
                    .filter_map(|r| r.ok())
                    .filter_map(|(h, s)| <[u8; 32]>::try_from(h).ok().map(|h| (crate::proto::entry::ContentHash(h), s as u64)))
                    .collect();
                MeshReply::Blobs(rows)
            }
            MeshOp::BlobsArrived(peer, blobs) => {
                let now = engine.now_ms();
                engine.tree_mut().transact(Ids::AtMost(0), now, |tx| -> Result<(), StoreError> {
                    let mut st = tx.conn().prepare_cached("UPDATE blob SET present = 1, indexed = (?2 IS NULL), data = COALESCE(?2, data) WHERE hash = ?1")?;
                    // Servable from now on to the members of each bucket in which `peer` itself
                    // wrote a version naming it: it had the bytes there. (Not every bucket of
                    // `peer` that names the hash: `peer` may have served it on account of
                    // another bucket, and a third member's entry may name it only to get it.)
                    let mut mark = tx.conn().prepare_cached(
                        "INSERT OR IGNORE INTO bucket_blob(bucket_id, hash)
                         SELECT DISTINCT b.bucket_id, ?1 FROM version v JOIN branch b ON b.id = v.branch_id
                         WHERE v.hash = ?1 AND substr(v.vkey, 13, 32) = ?2
                           AND b.bucket_id IN (SELECT bucket_id FROM mesh_member WHERE node = ?2 AND removed_ms IS NULL)",
                    )?;
                    for (hash, inline) in &blobs {
                        st.execute(params![hash.0.to_vec(), inline])?;
                        mark.execute(params![hash.0.to_vec(), peer.0])?;
                    }
                    Ok(())
                })?;
                MeshReply::Done
            }
            MeshOp::ReleaseDue => {
                // Both cost next to nothing while `mesh_future` is empty (all but a wrong clock).
                let missing = self.release_due(engine)?.missing_blobs;
                MeshReply::ClockWaits(missing, clock_waits(engine.tree().conn(), engine.now_ms())?, self.take_wait_hits())
            }
        })
    }
}
