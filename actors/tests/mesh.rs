//! The store's half of the mesh on real stores, with the network replaced by function calls:
//! invitation and admission, publishing from the outbox, the sync protocol over the bucket's
//! documents until quiet, membership, and a restart that reads the documents back.

use alknet_actors::engine::compaction as mesh_epoch;
use alknet_actors::engine::mesh::{self, Mesh};
use alknet_actors::engine::{Access, Engine};
use alknet_actors::proto::ids::{NodeId, Uid};
use alknet_actors::proto::sync::DOCS;

mod common;
use common::{deliver, fresh, get, main_scope, p, put};

struct Node {
    dir: tempfile::TempDir,
    engine: Engine,
    mesh: Mesh,
}

impl Node {
    fn new() -> Node {
        let (dir, engine) = fresh();
        let mesh = Mesh::new(&engine).unwrap();
        Node { dir, engine, mesh }
    }

    /// A node whose engine reads the time from a clock the test sets.
    fn with_clock() -> (Node, std::sync::Arc<alknet_actors::proto::clock::ManualClock>) {
        let (dir, engine, clock) = common::fresh_with_clock();
        let mesh = Mesh::new(&engine).unwrap();
        (Node { dir, engine, mesh }, clock)
    }

    fn me(&self) -> NodeId {
        self.engine.tree().me()
    }
}

/// Runs the sync protocol for every document of bucket `uid` between `a` and `b` until
/// neither has anything to say. Returns the number of messages.
fn sync(a: &mut Node, b: &mut Node, uid: &Uid) -> usize {
    a.mesh.publish(&mut a.engine).unwrap();
    b.mesh.publish(&mut b.engine).unwrap();
    // Summaries both ways, as a session opens: each side learns where the other is in step.
    let ours = a.mesh.summary(&a.engine, uid).unwrap();
    let theirs = b.mesh.summary(&b.engine, uid).unwrap();
    let differ = a.mesh.compare(&a.engine, &b.me(), uid, &theirs).unwrap();
    assert_eq!(b.mesh.compare(&b.engine, &a.me(), uid, &ours).unwrap(), differ);
    differ.into_iter().map(|doc| sync_doc(a, b, uid, doc)).sum()
}

/// Runs the sync protocol for document `doc` of bucket `uid` only, between `a` and `b`, as
/// sessions do (each side speaks, the other answers while it has something to say) until
/// neither has anything to say (what they have not published yet stays out). Returns the
/// number of messages.
fn sync_doc(a: &mut Node, b: &mut Node, uid: &Uid, doc: u16) -> usize {
    let (ida, idb) = (a.me(), b.me());
    let mut messages = 0;
    for _ in 0..20 {
        let mut quiet = true;
        if let Some(m) = a.mesh.generate(&a.engine, &idb, uid, doc).unwrap() {
            messages += deliver((&mut a.mesh, &mut a.engine), (&mut b.mesh, &mut b.engine), uid, doc, m);
            quiet = false;
        }
        if let Some(m) = b.mesh.generate(&b.engine, &ida, uid, doc).unwrap() {
            messages += deliver((&mut b.mesh, &mut b.engine), (&mut a.mesh, &mut a.engine), uid, doc, m);
            quiet = false;
        }
        if quiet {
            return messages;
        }
    }
    panic!("sync of doc {doc} did not settle");
}

fn adoption(name: String, bucket: Uid, root: alknet_actors::proto::replica::BranchRecord, inviter: NodeId) -> mesh::Adoption {
    mesh::Adoption { name, bucket, root, inviter, inviter_addrs: vec![], my_addrs: vec![] }
}

fn join(inviter: &mut Node, joiner: &mut Node) -> Uid {
    let (uid, secret) = inviter.mesh.invite(&mut inviter.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    let (name, root) = inviter.mesh.admit(&mut inviter.engine, &uid, &secret, &joiner.me(), &[]).unwrap().unwrap();
    joiner.mesh.adopt(&mut joiner.engine, &adoption(name, uid, root, inviter.me())).unwrap();
    // A used-up ticket is refused.
    let again = inviter.mesh.admit(&mut inviter.engine, &uid, &secret, &NodeId([9; 32]), &[]).unwrap();
    assert!(again.is_err());
    uid
}

#[test]
fn a_joined_node_gets_the_history_and_both_converge() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let s = main_scope();
    put(&mut a.engine, &s, "/before-invite.txt", b"old");
    a.engine.create_branch(&s, "feat", None).unwrap();
    let uid = join(&mut a, &mut b);
    put(&mut a.engine, &s, "/after.txt", b"a");
    put(&mut b.engine, &s, "/from-b.txt", b"b");
    let first = sync(&mut a, &mut b, &uid);
    assert!(first > 0);
    for node in [&a, &b] {
        let names: Vec<String> = node.engine.walk(&s, &p("/")).unwrap().iter().map(|r| r.path.to_string()).collect();
        assert_eq!(names, ["/after.txt", "/before-invite.txt", "/from-b.txt"]);
        assert!(node.engine.tree().branch("default", "feat").is_ok(), "the branch arrived");
    }
    // Inline blobs are not carried by the documents: the version is here, its bytes pending.
    assert!(b.engine.tree().conn().query_row("SELECT count(*) FROM blob WHERE present = 0", [], |r| r.get::<_, i64>(0)).unwrap() >= 1);
    // In step: summaries agree, nothing to send.
    assert_eq!(a.mesh.summary(&a.engine, &uid).unwrap(), b.mesh.summary(&b.engine, &uid).unwrap());
    assert_eq!(sync(&mut a, &mut b, &uid), 0);
    // Members: both, on both.
    for node in [&a, &b] {
        let bucket = node.engine.bucket_identity("default").unwrap();
        let mut members: Vec<NodeId> = mesh::members(node.engine.tree().conn(), bucket.id).unwrap().iter().map(|m| m.node).collect();
        members.sort();
        let mut want = vec![a.me(), b.me()];
        want.sort();
        assert_eq!(members, want);
    }
}

/// `proto::fanout` on real stores: a pushed change is applied and not answered, and a
/// message that brings nothing writes nothing (no transaction) and is not answered either.
#[test]
fn a_push_is_not_answered_and_a_message_that_brings_nothing_writes_nothing() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let s = main_scope();
    let uid = join(&mut a, &mut b);
    sync(&mut a, &mut b, &uid);
    let (ida, idb) = (a.me(), b.me());
    put(&mut a.engine, &s, "/pushed.txt", b"a");
    let changed = a.mesh.publish(&mut a.engine).unwrap().changed;
    assert_eq!(changed.len(), 1, "one document changed: {changed:?}");
    let (_, doc) = changed[0];
    let push = a.mesh.generate(&a.engine, &idb, &uid, doc).unwrap().expect("a pushes its change");
    let got = b.mesh.receive(&mut b.engine, &ida, &uid, doc, &push).unwrap();
    assert_eq!((got.entries, got.applied.inserted), (1, 1));
    assert!(got.answer.is_none(), "b only got what it lacked: nothing to answer");
    assert_eq!(listed(&b), listed(&a), "b shows what a wrote");
    // b's own message on that document now says only what a has: heads it already holds.
    let news = b.mesh.generate(&b.engine, &ida, &uid, doc).unwrap().expect("b's heads changed since it last spoke");
    let before = a.engine.tree().conn().total_changes();
    let nothing = a.mesh.receive(&mut a.engine, &idb, &uid, doc, &news).unwrap();
    assert_eq!(nothing.entries, 0);
    assert!(nothing.answer.is_none(), "a message that brings nothing is not answered");
    assert_eq!(a.engine.tree().conn().total_changes(), before, "a message that brings nothing costs no write");
}

/// Documents past the memory budget are dropped, least recently used first, and read back
/// from the database when next used: the node syncs as before.
#[test]
fn documents_past_their_budget_are_dropped_and_read_back_when_next_used() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let s = main_scope();
    let uid = join(&mut a, &mut b);
    for i in 0..300 {
        put(&mut a.engine, &s, &format!("/f{i}"), format!("file {i}").as_bytes());
    }
    sync(&mut a, &mut b, &uid);
    let (docs, bytes) = a.mesh.docs_in_memory();
    assert!(docs > DOCS as usize / 2 && bytes > 0, "{docs} documents, {bytes} bytes in memory");
    a.mesh.set_doc_budget(bytes / 4);
    let dropped = a.mesh.trim();
    let (left, left_bytes) = a.mesh.docs_in_memory();
    assert!(dropped > 0 && left + dropped == docs, "{dropped} dropped of {docs}");
    assert!(left_bytes <= bytes / 4, "{left_bytes} bytes left, budget {}", bytes / 4);
    // Used again: read back, written to, synced.
    for i in 300..400 {
        put(&mut a.engine, &s, &format!("/f{i}"), format!("file {i}").as_bytes());
        put(&mut b.engine, &s, &format!("/g{i}"), format!("file {i}").as_bytes());
    }
    assert!(sync(&mut a, &mut b, &uid) > 0);
    a.mesh.trim();
    assert!(a.mesh.docs_in_memory().1 <= bytes / 4);
    assert_eq!(listed(&a), listed(&b));
    assert_eq!(listed(&a).len(), 500);
    assert_eq!(a.mesh.summary(&a.engine, &uid).unwrap(), b.mesh.summary(&b.engine, &uid).unwrap());
}

#[test]
fn documents_survive_a_restart_and_a_removal_reaches_the_other_member() {
    let (mut a, mut b, mut c) = (Node::new(), Node::new(), Node::new());
    let uid = join(&mut a, &mut b);
    let (uid2, secret) = a.mesh.invite(&mut a.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    assert_eq!(uid, uid2);
    let (name, root) = a.mesh.admit(&mut a.engine, &uid, &secret, &c.me(), &[]).unwrap().unwrap();
    c.mesh.adopt(&mut c.engine, &adoption(name, uid, root, a.me())).unwrap();
    put(&mut a.engine, &main_scope(), "/x", b"x");
    sync(&mut a, &mut b, &uid);
    // A restarts: its documents are read back from tree.db, and are still in step with B's.
    let dir = a.dir;
    drop(a.engine);
    let engine = Engine::open(dir.path(), Access::Write).unwrap();
    let mut a = Node { mesh: Mesh::new(&engine).unwrap(), engine, dir };
    assert_eq!(a.mesh.summary(&a.engine, &uid).unwrap(), b.mesh.summary(&b.engine, &uid).unwrap());
    // A synced with C, whose session ended (its sync states saved) and started again.
    let sync_rows = |n: &Node, peer: &NodeId| n.engine.tree().conn().query_row("SELECT count(*) FROM mesh_sync WHERE peer = ?1", [peer.0.to_vec()], |r| r.get::<_, i64>(0)).unwrap();
    sync(&mut a, &mut c, &uid);
    a.mesh.end_session(&mut a.engine, &c.me()).unwrap();
    assert!(sync_rows(&a, &c.me()) > 0, "a session's states are saved when it ends");
    sync(&mut a, &mut c, &uid);
    // A removes C; B learns it by sync and no longer counts C as a member.
    a.mesh.remove_member(&mut a.engine, "default", &c.me()).unwrap();
    a.mesh.end_session(&mut a.engine, &c.me()).unwrap();
    assert_eq!(sync_rows(&a, &c.me()), 0, "a departed peer's sync states go, and its session's end does not write them back");
    sync(&mut a, &mut b, &uid);
    assert_eq!(sync_rows(&b, &c.me()), 0);
    let in_b = mesh::buckets_of(b.engine.tree().conn(), &c.me()).unwrap();
    assert!(in_b.is_empty(), "B still counts C as a member: {in_b:?}");
    assert!(mesh::buckets_of(b.engine.tree().conn(), &a.me()).unwrap().iter().any(|(_, u)| *u == uid));
    // C was a member and is not any more: its admission with another ticket is refused.
    let (_, secret) = a.mesh.invite(&mut a.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    assert!(a.mesh.admit(&mut a.engine, &uid, &secret, &c.me(), &[]).unwrap().is_err());
    assert!(b.engine.file_entry(&main_scope(), &p("/x")).is_ok(), "B has the entry; its bytes are still on A (no blob transfer here)");
    assert_eq!(get(&a.engine, &main_scope(), "/x").unwrap(), b"x");
}

#[test]
fn a_branch_deleted_on_one_node_is_deleted_on_the_other() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let uid = join(&mut a, &mut b);
    a.engine.create_branch(&main_scope(), "old-idea", None).unwrap();
    sync(&mut a, &mut b, &uid);
    assert!(b.engine.tree().branch("default", "old-idea").is_ok());
    b.engine.delete_branch(&main_scope(), "old-idea").unwrap();
    sync(&mut a, &mut b, &uid);
    assert!(a.engine.tree().branch("default", "old-idea").is_err(), "the deletion reached A");
    // A deleted branch's name is free again, on both nodes.
    a.engine.create_branch(&main_scope(), "old-idea", None).unwrap();
    sync(&mut a, &mut b, &uid);
    assert!(b.engine.tree().branch("default", "old-idea").is_ok());
}

/// A rename's two versions live in two shards, so they travel in two documents: B, given the
/// document with one half only, shows neither half (the old path stays, the new one does not
/// appear) until the other half arrives; then both at once. Held across a restart.
#[test]
fn a_rename_arrives_whole_even_when_its_halves_travel_apart() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let s = main_scope();
    let uid = join(&mut a, &mut b);
    // Two paths whose versions land in different shards.
    let root = a.engine.branch_records("default").unwrap().into_iter().find(|r| r.parent.is_none()).unwrap().uid;
    let shard = |path: &str| alknet_actors::proto::replica::shard_of(&root, &p(path));
    let (from, to) = (0..200).map(|i| (format!("/from{i}"), format!("/to{i}"))).find(|(f, t)| shard(f) != shard(t)).unwrap();
    put(&mut a.engine, &s, &from, b"moving");
    sync(&mut a, &mut b, &uid);
    // The documents carry versions, not bytes: what B lists is what it shows.
    let listed = |b: &Node| -> Vec<String> { b.engine.walk(&s, &p("/")).unwrap().iter().map(|r| r.path.to_string()).collect() };
    assert_eq!(listed(&b), std::slice::from_ref(&from));
    a.engine.rename(&s, &p(&from), &p(&to)).unwrap();
    a.mesh.publish(&mut a.engine).unwrap();
    sync_doc(&mut a, &mut b, &uid, shard(&from));
    assert_eq!(listed(&b), std::slice::from_ref(&from), "half a rename shown");
    // B restarts in between: what it held back is still held.
    let Node { dir, engine, .. } = b;
    drop(engine);
    let engine = Engine::open(dir.path(), Access::Write).unwrap();
    let mesh = Mesh::new(&engine).unwrap();
    let mut b = Node { dir, engine, mesh };
    sync_doc(&mut a, &mut b, &uid, shard(&to));
    assert_eq!(listed(&b), std::slice::from_ref(&to), "the whole rename, once its second half arrived");
}

#[test]
fn a_removal_takes_back_what_the_removed_member_did_that_its_remover_had_not_seen() {
    // The partition harness's seed 656 on real stores: R is removed by A while B is away; R,
    // unaware, writes and admits N; B meets R before it meets A.
    let (mut a, mut b, mut r, mut n) = (Node::new(), Node::new(), Node::new(), Node::new());
    let s = main_scope();
    let uid = join(&mut a, &mut b);
    join(&mut a, &mut r);
    // R is an owner (it admits N below).
    a.mesh.grant_role(&mut a.engine, "default", &r.me(), alknet_actors::proto::membership::Role::Owner).unwrap();
    put(&mut r.engine, &s, "/r-before.txt", b"seen by A");
    sync(&mut a, &mut r, &uid);
    sync(&mut a, &mut b, &uid);
    sync(&mut b, &mut r, &uid);
    a.mesh.remove_member(&mut a.engine, "default", &r.me()).unwrap();
    put(&mut r.engine, &s, "/r-after.txt", b"unseen");
    join(&mut r, &mut n);
    sync(&mut r, &mut n, &uid);
    put(&mut n.engine, &s, "/n.txt", b"from a node a removed member admitted");
    sync(&mut r, &mut n, &uid);
    let listed = |x: &Node| -> Vec<String> { x.engine.walk(&s, &p("/")).unwrap().iter().map(|r| r.path.to_string()).collect() };
    sync(&mut b, &mut r, &uid);
    assert_eq!(listed(&b), ["/n.txt", "/r-after.txt", "/r-before.txt"], "B, not knowing of the removal, takes all of it");
    let bucket = b.engine.bucket_identity("default").unwrap().id;
    let cursor = alknet_actors::store::outbox::head(b.engine.tree().conn()).unwrap();
    sync(&mut a, &mut b, &uid);
    for (name, node) in [("A", &a), ("B", &b)] {
        assert_eq!(listed(node), ["/r-before.txt"], "{name} shows what R did unseen by its remover");
        for cut in [r.me(), n.me()] {
            assert!(mesh::buckets_of(node.engine.tree().conn(), &cut).unwrap().is_empty(), "{name} still lets {cut} in");
        }
    }
    let events = alknet_actors::store::outbox::read_after(b.engine.tree().conn(), cursor, 100).unwrap();
    let retracted: Vec<_> = events.iter().filter(|(_, e)| e.op == "retracted").filter_map(|(_, e)| e.path.clone()).collect();
    assert_eq!(retracted.len(), 2, "one event per path taken back: {events:?}");
    // Kept out across a restart; the removed node keeps its own writes.
    let Node { dir, engine, .. } = b;
    drop(engine);
    let engine = Engine::open(dir.path(), Access::Write).unwrap();
    let mut b = Node { mesh: Mesh::new(&engine).unwrap(), engine, dir };
    sync(&mut a, &mut b, &uid);
    assert_eq!(listed(&b), ["/r-before.txt"]);
    assert_eq!(b.engine.tree().conn().query_row("SELECT count(*) FROM mesh_deferred WHERE bucket_id = ?1", [bucket], |r| r.get::<_, i64>(0)).unwrap(), 2);
    assert_eq!(listed(&r), ["/n.txt", "/r-after.txt", "/r-before.txt"]);
}

/// A write the mesh has not published yet survives outbox pruning whatever its age and
/// whoever else has read it: the publisher's cursor holds it (it used to expire after a week
/// idle, and a `watch` that had read past the event let GC prune it, so peers never got it).
#[test]
fn an_unpublished_write_is_never_pruned_from_the_outbox() {
    use alknet_actors::gc::Retention;
    use alknet_actors::proto::clock::Clock;
    use alknet_actors::store::outbox;
    const DAY_MS: i64 = 86_400_000;
    let (mut a, clock) = Node::with_clock();
    clock.set(alknet_actors::engine::now_ms());
    let (mut b, clock_b) = Node::with_clock();
    clock_b.set(clock.now_ms());
    let uid = join(&mut a, &mut b);
    sync(&mut a, &mut b, &uid);
    // A week and a day later (the publisher idle all along), a write is committed and a
    // `watch` reads past it before the mesh publishes it.
    clock.advance(8 * DAY_MS);
    clock_b.advance(8 * DAY_MS);
    let s = main_scope();
    put(&mut a.engine, &s, "/late.txt", b"written while the mesh was idle");
    let head = outbox::head(a.engine.tree().conn()).unwrap();
    outbox::save_cursor(a.engine.tree().conn(), "watch", head, clock.now_ms()).unwrap();
    let report = a.engine.gc(Retention { outbox_keep_days: 7, ..Retention::default() }).unwrap();
    let kept = outbox::read_after(a.engine.tree().conn(), head - 1, 10).unwrap();
    assert_eq!(kept.len(), 1, "the unpublished event was pruned ({report:?})");
    let listed = outbox::consumers(a.engine.tree().conn(), clock.now_ms() - 7 * DAY_MS).unwrap();
    assert!(listed.iter().any(|c| c.name == mesh::MESH_CONSUMER && !c.expired), "{listed:?}");
    sync(&mut a, &mut b, &uid);
    let there = b.engine.file_entry(&s, &p("/late.txt")).expect("the write reached the peer");
    assert_eq!(there.hash, a.engine.file_entry(&s, &p("/late.txt")).unwrap().hash);
    // Once published, the event may go.
    assert!(a.engine.gc(Retention { outbox_keep_days: 7, ..Retention::default() }).unwrap().events_pruned >= 1);
}

/// A branch record that reaches a node before its parent's (from another member, in an
/// earlier message) waits in the bucket's document, and is applied when the parent's record
/// arrives (it used to wait forever: only the records new in a message were read).
#[test]
fn a_branch_whose_parent_record_arrives_later_is_applied_when_it_does() {
    use alknet_actors::engine::Scope;
    use alknet_actors::proto::doc::ReplicaDoc;
    use alknet_actors::proto::replica::{BranchRecord, MetaEntry};
    let (mut a, mut b) = (Node::new(), Node::new());
    let uid = join(&mut a, &mut b);
    sync(&mut a, &mut b, &uid);
    // A makes branch `p` and has not told B yet. A third member, Z, already knows `p` and
    // made `q` from it, and reaches B first: its record names a parent B has never heard of.
    let p = a.engine.create_branch(&main_scope(), "p", None).unwrap();
    let p_rec = alknet_actors::store::replica::branch_record(a.engine.tree().conn(), &p).unwrap();
    let zkey = alknet_actors::proto::signed::EntrySigner::new(&[0x5a; 32]);
    let z = zkey.id();
    let q = MetaEntry::Branch(BranchRecord { uid: Uid::mint(&z, [7; 8]), name: "q".into(), parent: Some(p_rec.uid), fork: p_rec.fork, created_ms: p_rec.created_ms });
    let mut zdoc = ReplicaDoc::new(&[0x5a; 20]);
    zdoc.put(&q.key(), &zkey.seal(&uid, &q.key(), &q.value())).unwrap();
    let mut zstate = Default::default();
    for _ in 0..10 {
        let Some(m) = zdoc.generate(&mut zstate) else { break };
        let got = b.mesh.receive(&mut b.engine, &z, &uid, alknet_actors::proto::sync::META_DOC, &m).unwrap();
        if let Some(back) = got.answer {
            zdoc.receive(&mut zstate, &back, |_| Ok(())).unwrap();
        }
    }
    assert!(b.engine.branch(&Scope::new("default", "q")).is_err(), "q was applied before its parent was known");
    // Now `p` arrives from A: `q` comes with it.
    sync(&mut a, &mut b, &uid);
    assert!(b.engine.branch(&Scope::new("default", "p")).is_ok());
    let got = b.engine.branch(&Scope::new("default", "q")).expect("q applied once its parent arrived");
    assert_eq!(got.depth, 2);
}

/// Every live path of the branch and what `ls -R` shows: they must be the same set (no
/// file readable that no listing reaches).
fn shape(engine: &Engine) -> (Vec<String>, Vec<String>) {
    let s = main_scope();
    let mut listed = Vec::new();
    let mut dirs = vec![p("/")];
    while let Some(d) = dirs.pop() {
        for r in engine.list(&s, &d).unwrap() {
            let Some(e) = r.version.entry.as_ref() else { continue };
            listed.push(r.path.to_string());
            if e.kind == alknet_actors::proto::entry::EntryKind::Dir {
                dirs.push(r.path.clone());
            }
        }
    }
    listed.sort();
    let mut walked: Vec<String> = engine.walk(&s, &p("/")).unwrap().iter().filter(|r| r.version.entry.is_some()).map(|r| r.path.to_string()).collect();
    walked.sort();
    (listed, walked)
}

/// A write under a directory another node removed, moved or replaced by a file while the
/// two were apart stays live at its path on both (the directory comes back; a file in its
/// way is listed), whichever way the versions travel, and the two show the same tree.
#[test]
fn a_write_under_a_directory_removed_moved_or_replaced_elsewhere_stays_listed_on_every_node() {
    for (case, elsewhere) in [("removed", 0), ("moved", 1), ("replaced by a file", 2)] {
        for a_first in [true, false] {
            let (mut a, mut b) = (Node::new(), Node::new());
            let uid = join(&mut a, &mut b);
            let s = main_scope();
            put(&mut a.engine, &s, "/d/old.txt", b"old");
            sync(&mut a, &mut b, &uid);
            // Apart: B writes below /d; A removes /d, moves it, or puts a file there.
            put(&mut b.engine, &s, "/d/new.txt", b"written on B");
            match elsewhere {
                0 => {
                    a.engine.remove(&s, &p("/d"), true).unwrap();
                }
                1 => {
                    a.engine.rename(&s, &p("/d"), &p("/e")).unwrap();
                }
                _ => {
                    a.engine.remove(&s, &p("/d"), true).unwrap();
                    put(&mut a.engine, &s, "/d", b"a file where the directory was");
                }
            }
            if a_first {
                sync(&mut a, &mut b, &uid);
            } else {
                sync(&mut b, &mut a, &uid);
            }
            // The repairs each side wrote travel too.
            sync(&mut a, &mut b, &uid);
            for (who, n) in [("A", &a), ("B", &b)] {
                let (listed, walked) = shape(&n.engine);
                assert_eq!(listed, walked, "{case}, on {who}: a path readable that no listing reaches");
                assert!(listed.contains(&"/d/new.txt".to_string()), "{case}, on {who}: B's write is not listed: {listed:?}");
            }
            assert_eq!(shape(&a.engine), shape(&b.engine), "{case}: the two show the same tree");
            let listed = |n: &Node| n.engine.conflicts(&s).unwrap().iter().map(|c| (c.path.clone(), c.loser)).collect::<Vec<_>>();
            assert_eq!(listed(&a), listed(&b), "{case}: the same conflicts on both");
            if elsewhere == 2 {
                assert!(listed(&a).iter().any(|(p, _)| p == "/d"), "{case}: the file that stood in the way is listed: {:?}", listed(&a));
            } else {
                assert!(listed(&a).is_empty(), "{case}: nothing lost, nothing listed: {:?}", listed(&a));
            }
        }
    }
}

const YEAR_MS: i64 = 365 * 24 * 3_600_000;

/// The stamp (ms) of the newest version of `path`.
fn written_ms(engine: &Engine, path: &str) -> i64 {
    engine.log(&main_scope(), &p(path)).unwrap().iter().map(|r| r.key.stamp().ms).max().unwrap()
}

#[test]
fn a_peer_ten_years_ahead_waits_for_its_time_and_does_not_drag_the_clock_along() {
    use alknet_actors::proto::clock::Clock;
    let s = main_scope();
    let (mut a, clock_a) = Node::with_clock();
    let (mut z, clock_z) = Node::with_clock();
    clock_z.set(clock_a.now_ms() + 10 * YEAR_MS);
    let uid = join(&mut a, &mut z);
    put(&mut a.engine, &s, "/from-a.txt", b"a");
    put(&mut z.engine, &s, "/from-z.txt", b"z");
    sync(&mut a, &mut z, &uid);
    // Z applied A's version (it is in Z's past); A holds Z's, unapplied, and says whose.
    assert!(z.engine.file_entry(&s, &p("/from-a.txt")).is_ok());
    assert!(a.engine.file_entry(&s, &p("/from-z.txt")).is_err(), "a version ten years ahead is not applied");
    let waits = mesh::clock_waits(a.engine.tree().conn(), clock_a.now_ms()).unwrap();
    assert_eq!(waits.len(), 1);
    assert_eq!(waits[0].writer, z.me().to_hex());
    assert!(waits[0].ahead_ms > 9 * YEAR_MS, "{waits:?}");
    // A's clock did not move: its next version is dated now, not ten years on.
    clock_a.advance(1_000);
    put(&mut a.engine, &s, "/later.txt", b"a2");
    assert_eq!(written_ms(&a.engine, "/later.txt"), clock_a.now_ms());
    // Nothing is due yet; syncing again changes nothing.
    assert_eq!(a.mesh.release_due(&mut a.engine).unwrap().inserted, 0);
    sync(&mut a, &mut z, &uid);
    assert!(a.engine.file_entry(&s, &p("/from-z.txt")).is_err());
    // Within the bound of its time, it is applied.
    clock_a.set(written_ms(&z.engine, "/from-z.txt") - 3_000_000);
    assert_eq!(a.mesh.release_due(&mut a.engine).unwrap().inserted, 1);
    assert!(a.engine.file_entry(&s, &p("/from-z.txt")).is_ok());
    assert!(mesh::clock_waits(a.engine.tree().conn(), clock_a.now_ms()).unwrap().is_empty());
}

#[test]
fn a_clock_set_right_after_running_years_ahead_stamps_real_time_and_later_writes_still_show() {
    let s = main_scope();
    let (mut z, clock) = Node::with_clock();
    let now = clock_now(&clock);
    clock.set(now + 10 * YEAR_MS);
    put(&mut z.engine, &s, "/f.txt", b"written while the clock was wrong");
    clock.set(now + 1_000);
    // The clock returns: a new path is dated by the wall clock.
    put(&mut z.engine, &s, "/g.txt", b"g");
    assert_eq!(written_ms(&z.engine, "/g.txt"), now + 1_000);
    // A path whose head is stamped ahead: the new write orders after it, and shows.
    put(&mut z.engine, &s, "/f.txt", b"after the clock was set right");
    assert_eq!(get(&z.engine, &s, "/f.txt").unwrap(), b"after the clock was set right");
    assert!(written_ms(&z.engine, "/f.txt") > now + 9 * YEAR_MS);
    // And that did not drag the clock ahead again.
    clock.set(now + 2_000);
    put(&mut z.engine, &s, "/h.txt", b"h");
    assert_eq!(written_ms(&z.engine, "/h.txt"), now + 2_000);
    put(&mut z.engine, &s, "/g.txt", b"g2");
    assert_eq!(get(&z.engine, &s, "/g.txt").unwrap(), b"g2");
}

fn clock_now(clock: &alknet_actors::proto::clock::ManualClock) -> i64 {
    use alknet_actors::proto::clock::Clock;
    clock.now_ms()
}

const DAY_MS: i64 = 24 * 3_600_000;

/// The paths B lists on main.
fn listed(n: &Node) -> Vec<String> {
    n.engine.walk(&main_scope(), &p("/")).unwrap().iter().map(|r| r.path.to_string()).collect()
}

fn count_rows(n: &Node, table: &str) -> i64 {
    n.engine.tree().conn().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
}

/// Renames (from, to) of files whose four versions' shards differ from each other's, so
/// each half travels alone.
fn renames_apart(a: &Node, n: usize) -> Vec<(String, String)> {
    let root = a.engine.branch_records("default").unwrap().into_iter().find(|r| r.parent.is_none()).unwrap().uid;
    let shard = |path: &str| alknet_actors::proto::replica::shard_of(&root, &p(path));
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::new();
    for i in 0..1000 {
        let (from, to) = (format!("/from{i}"), format!("/to{i}"));
        let (sf, st) = (shard(&from), shard(&to));
        if sf != st && !used.contains(&sf) && !used.contains(&st) {
            used.extend([sf, st]);
            out.push((from, to));
            if out.len() == n {
                break;
            }
        }
    }
    out
}

/// A member that starts operations and never finishes them costs a bounded wait: past the
/// writer's bound its oldest operation is applied as it stands, and past its time so is the
/// rest; the missing halves, when they come at last, apply at once. Nothing is lost.
#[test]
fn an_operation_that_never_wholly_arrives_is_applied_as_it_stands_past_its_bound_or_its_time() {
    let (mut a, _clock_a) = Node::with_clock();
    let (mut b, clock_b) = Node::with_clock();
    b.mesh.set_wait_bounds(alknet_actors::store::waiting::WaitBounds { held_per_writer: 1, ..Default::default() });
    let s = main_scope();
    let uid = join(&mut a, &mut b);
    let pairs = renames_apart(&a, 2);
    let root = a.engine.branch_records("default").unwrap().into_iter().find(|r| r.parent.is_none()).unwrap().uid;
    let shard = |path: &str| alknet_actors::proto::replica::shard_of(&root, &p(path));
    for (from, _) in &pairs {
        put(&mut a.engine, &s, from, b"moving");
    }
    sync(&mut a, &mut b, &uid);
    let mut from: Vec<String> = pairs.iter().map(|(f, _)| f.clone()).collect();
    from.sort();
    assert_eq!(listed(&b), from);
    for (from, to) in &pairs {
        a.engine.rename(&s, &p(from), &p(to)).unwrap();
    }
    a.mesh.publish(&mut a.engine).unwrap();
    // The first rename's delete arrives alone: held, within the bound of one version.
    sync_doc(&mut a, &mut b, &uid, shard(&pairs[0].0));
    assert!(listed(&b).contains(&pairs[0].0), "half a rename shown");
    assert_eq!(count_rows(&b, "mesh_held"), 1);
    // The second's: the writer now holds two, over its bound; its oldest operation goes as
    // it stands (the first file's delete shows), the second waits.
    sync_doc(&mut a, &mut b, &uid, shard(&pairs[1].0));
    assert_eq!(count_rows(&b, "mesh_held"), 1);
    let now = listed(&b);
    assert!(!now.contains(&pairs[0].0) && now.contains(&pairs[1].0), "{now:?}");
    let hits = b.mesh.take_wait_hits();
    assert_eq!(hits.iter().map(|h| h.name).collect::<Vec<_>>(), ["HELD_VERSIONS_PER_WRITER_MAX"], "{hits:?}");
    // A day later the second goes as it stands too.
    clock_b.advance(DAY_MS - 1_000);
    b.mesh.release_due(&mut b.engine).unwrap();
    assert_eq!(count_rows(&b, "mesh_held"), 1, "held before its time ran out");
    clock_b.advance(1_000);
    b.mesh.release_due(&mut b.engine).unwrap();
    assert_eq!(count_rows(&b, "mesh_held"), 0);
    assert!(listed(&b).is_empty(), "{:?}", listed(&b));
    assert_eq!(b.mesh.take_wait_hits().iter().map(|h| h.name).collect::<Vec<_>>(), ["HELD_OPERATION_SECS_MAX"]);
    // The other halves, when they come, apply at once: both files are where A put them.
    sync(&mut a, &mut b, &uid);
    let mut want: Vec<String> = pairs.iter().map(|(_, t)| t.clone()).collect();
    want.sort();
    assert_eq!(listed(&b), want);
    assert_eq!(count_rows(&b, "mesh_held"), 0);
}

/// Versions of a writer whose admission has not arrived wait, within a bucket's bound and
/// for a bounded time; those that leave the wait are not lost: once the admission arrives,
/// the bucket's documents are read again and they are applied.
#[test]
fn versions_that_left_the_wait_over_its_bound_or_past_its_time_are_applied_once_their_writer_is_admitted() {
    for over_time in [false, true] {
        let (mut a, _clock_a) = Node::with_clock();
        let (mut b, clock_b) = Node::with_clock();
        let (mut c, _clock_c) = Node::with_clock();
        b.mesh.set_wait_bounds(alknet_actors::store::waiting::WaitBounds { deferred_per_bucket: if over_time { 100 } else { 1 }, ..Default::default() });
        let s = main_scope();
        let uid = join(&mut a, &mut b);
        sync(&mut a, &mut b, &uid);
        join(&mut a, &mut c);
        sync(&mut a, &mut c, &uid);
        let files = ["/c1.txt", "/c2.txt", "/c3.txt"];
        for f in files {
            put(&mut c.engine, &s, f, f.as_bytes());
        }
        sync(&mut a, &mut c, &uid);
        // B hears of C's versions before C's admission.
        a.mesh.publish(&mut a.engine).unwrap();
        for doc in 0..alknet_actors::proto::sync::DOCS {
            if doc != alknet_actors::proto::sync::META_DOC {
                sync_doc(&mut a, &mut b, &uid, doc);
            }
        }
        assert!(listed(&b).is_empty(), "a version of a writer B has not seen admitted was applied");
        let hits: Vec<&str> = b.mesh.take_wait_hits().iter().map(|h| h.name).collect();
        if over_time {
            assert_eq!(count_rows(&b, "mesh_deferred"), 3);
            clock_b.advance(7 * DAY_MS);
            b.mesh.release_due(&mut b.engine).unwrap();
            assert_eq!(b.mesh.take_wait_hits().iter().map(|h| h.name).collect::<Vec<_>>(), ["DEFERRED_SECS_MAX"]);
        } else {
            assert!(!hits.is_empty() && hits.iter().all(|h| *h == "DEFERRED_VERSIONS_PER_BUCKET_MAX"), "{hits:?}");
        }
        assert_eq!(count_rows(&b, "mesh_deferred"), if over_time { 0 } else { 1 });
        assert_eq!(count_rows(&b, "mesh_rescan"), 1);
        // The admission arrives: what still waited applies at once, the rest when the
        // documents are read again (at the next tick).
        sync_doc(&mut a, &mut b, &uid, alknet_actors::proto::sync::META_DOC);
        assert_eq!(listed(&b).len(), if over_time { 0 } else { 1 });
        b.mesh.release_due(&mut b.engine).unwrap();
        assert_eq!(listed(&b), files, "over_time: {over_time}");
        assert_eq!(count_rows(&b, "mesh_rescan"), 0, "the documents hold nothing more that waits");
    }
}

/// One step of [`a_pair_of_nodes_matches_a_model_through_random_ops_restarts_and_peer_messages`].
#[derive(Clone, Debug)]
enum Step {
    /// Node `0` (A) or `1` (B) writes `bytes` at path number `path`.
    Write(usize, usize, Vec<u8>),
    /// A node removes a path, if it shows one there.
    Remove(usize, usize),
    /// A node renames a path it shows to another it does not.
    Rename(usize, usize, usize),
    /// A node's process stops and starts again on its data dir.
    Restart(usize),
    /// The two run the sync protocol until quiet.
    Sync,
    /// B's next message to A arrives damaged at `flips`; both end the session (as a node
    /// drops a peer that sent one), then sync.
    Damaged(u16, Vec<(usize, u8)>),
}

const MODEL_PATHS: [&str; 5] = ["/f0", "/f1", "/d/f2", "/d/f3", "/d/e/f4"];

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let node = 0usize..2;
    let path = 0usize..MODEL_PATHS.len();
    prop_oneof![
        4 => (node.clone(), path.clone(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(n, p, b)| Step::Write(n, p, b)),
        2 => (node.clone(), path.clone()).prop_map(|(n, p)| Step::Remove(n, p)),
        1 => (node.clone(), path.clone(), path).prop_map(|(n, a, b)| Step::Rename(n, a, b)),
        1 => node.prop_map(Step::Restart),
        2 => Just(Step::Sync),
        1 => (0u16..DOCS, proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)).prop_map(|(d, f)| Step::Damaged(d, f)),
    ]
}

/// What a node should show: each path's last write or removal it knows of, with when it
/// happened (every step happens at its own, later millisecond, so the last writer wins).
type Known = std::collections::BTreeMap<&'static str, (i64, Option<String>)>;

/// The files a node shows, as (path, hash).
fn files_of(engine: &Engine) -> Vec<(String, String)> {
    let rows = engine.walk(&main_scope(), &p("/")).unwrap();
    rows.iter()
        .filter_map(|r| r.version.entry.as_ref().filter(|e| e.kind == alknet_actors::proto::entry::EntryKind::File).map(|e| (r.path.to_string(), e.hash.to_hex())))
        .collect()
}

fn shown(known: &Known) -> Vec<(String, String)> {
    known.iter().filter_map(|(p, (_, h))| h.as_ref().map(|h| (p.to_string(), h.clone()))).collect()
}

fn reopened(node: Node, clock: &std::sync::Arc<alknet_actors::proto::clock::ManualClock>) -> Node {
    let dir = node.dir;
    drop(node.mesh);
    drop(node.engine);
    let engine = Engine::open(dir.path(), Access::Write).unwrap().with_clock(clock.clone());
    Node { mesh: Mesh::new(&engine).unwrap(), engine, dir }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16),
        ..Default::default()
    })]

    /// The model-based target: two real stores sharing a bucket take random writes,
    /// removals, renames, restarts, syncs and damaged messages from each other, and after
    /// every step each shows what a plain model says (its own writes at once; the other's
    /// after a sync; the last writer of a path wins), and a sync leaves both the same.
    #[test]
    fn a_pair_of_nodes_matches_a_model_through_random_ops_restarts_and_peer_messages(steps in proptest::collection::vec(step(), 1..40)) {
        let clock = std::sync::Arc::new(alknet_actors::proto::clock::ManualClock::new(1_767_225_600_000));
        let node = || {
            let (dir, engine) = common::fresh();
            let engine = engine.with_clock(clock.clone());
            Node { mesh: Mesh::new(&engine).unwrap(), engine, dir }
        };
        let mut nodes = [Some(node()), Some(node())];
        let uid = {
            let [a, b] = &mut nodes;
            join(a.as_mut().unwrap(), b.as_mut().unwrap())
        };
        let mut known: [Known; 2] = Default::default();
        let s = main_scope();
        for (i, step) in steps.iter().enumerate() {
            clock.advance(1_000);
            let t = i as i64;
            match step {
                Step::Write(n, path, bytes) => {
                    let node = nodes[*n].as_mut().unwrap();
                    put(&mut node.engine, &s, MODEL_PATHS[*path], bytes);
                    known[*n].insert(MODEL_PATHS[*path], (t, Some(blake3::hash(bytes).to_hex().to_string())));
                }
                Step::Remove(n, path) => {
                    if known[*n].get(MODEL_PATHS[*path]).is_some_and(|(_, h)| h.is_some()) {
                        let node = nodes[*n].as_mut().unwrap();
                        node.engine.remove(&s, &p(MODEL_PATHS[*path]), false).unwrap();
                        known[*n].insert(MODEL_PATHS[*path], (t, None));
                    }
                }
                Step::Rename(n, from, to) => {
                    let (from, to) = (MODEL_PATHS[*from], MODEL_PATHS[*to]);
                    let hash = known[*n].get(from).and_then(|(_, h)| h.clone());
                    let free = known[*n].get(to).is_none_or(|(_, h)| h.is_none()) && !MODEL_PATHS.iter().any(|q| q.starts_with(&format!("{to}/")));
                    if let (Some(hash), true) = (hash, free && from != to) {
                        let node = nodes[*n].as_mut().unwrap();
                        node.engine.rename(&s, &p(from), &p(to)).unwrap();
                        known[*n].insert(from, (t, None));
                        known[*n].insert(to, (t, Some(hash)));
                    }
                }
                Step::Restart(n) => {
                    let node = nodes[*n].take().unwrap();
                    nodes[*n] = Some(reopened(node, &clock));
                }
                Step::Sync | Step::Damaged(..) => {
                    let [a, b] = &mut nodes;
                    let (a, b) = (a.as_mut().unwrap(), b.as_mut().unwrap());
                    if let Step::Damaged(doc, flips) = step {
                        b.mesh.publish(&mut b.engine).unwrap();
                        if let Some(m) = b.mesh.generate(&b.engine, &a.me(), &uid, *doc).unwrap() {
                            let mut bad = m.clone();
                            for (at, mask) in flips {
                                let k = at % bad.len();
                                bad[k] ^= (*mask).max(1);
                            }
                            let _ = a.mesh.receive(&mut a.engine, &b.me(), &uid, *doc, &bad);
                            let (ida, idb) = (a.me(), b.me());
                            a.mesh.end_session(&mut a.engine, &idb).unwrap();
                            b.mesh.end_session(&mut b.engine, &ida).unwrap();
                        }
                    }
                    sync(a, b, &uid);
                    let mut merged = known[0].clone();
                    for (path, (at, h)) in &known[1] {
                        if merged.get(path).is_none_or(|(mine, _)| mine < at) {
                            merged.insert(path, (*at, h.clone()));
                        }
                    }
                    known = [merged.clone(), merged];
                }
            }
            for n in 0..2 {
                let node = nodes[n].as_ref().unwrap();
                proptest::prop_assert_eq!(files_of(&node.engine), shown(&known[n]), "node {} after step {} ({:?})", n, i, step);
            }
        }
    }
}

/// The saved size of a node's shards of bucket `uid`.
fn shard_bytes(n: &Node, uid: &Uid) -> u64 {
    let bucket = n.engine.bucket_by_uid(uid).unwrap().unwrap();
    alknet_actors::engine::compaction::shard_bytes(n.engine.tree().conn(), bucket.id).unwrap()
}

/// What a node shows of a branch: every live path with its version, and its conflicts.
fn showing(n: &Node, branch: &str) -> (Vec<(String, alknet_actors::proto::ids::VersionId)>, Vec<(String, Option<alknet_actors::proto::ids::VersionId>)>) {
    let scope = alknet_actors::engine::Scope::new("default", branch);
    let files = n.engine.walk(&scope, &p("/")).unwrap().iter().filter(|r| r.version.entry.is_some()).map(|r| (r.path.to_string(), r.key.version())).collect();
    let mut conflicts: Vec<_> = n.engine.conflicts(&scope).unwrap().into_iter().map(|c| (c.path, c.loser)).collect();
    conflicts.sort();
    (files, conflicts)
}

/// A bucket whose one path was written hundreds of times compacts: both members derive the
/// same documents from the heads they agreed on (in step at once: nothing to send), the
/// documents shrink to what is live, and every branch shows what it showed, a branch forked
/// late included (it keeps the versions from its fork point on: the one it sees must stay
/// named by the next on main, or main would list it as a conflict). Writes after the epoch
/// sync as before.
#[test]
fn a_compacted_bucket_shows_the_same_on_every_branch_and_its_documents_shrink() {
    let (mut a, mut b) = (Node::new(), Node::new());
    let uid = join(&mut a, &mut b);
    let s = main_scope();
    put(&mut a.engine, &s, "/cold/x", b"cold");
    for i in 0..300 {
        put(&mut a.engine, &s, "/hot", format!("hot {i}").as_bytes());
        if i == 280 {
            a.engine.create_branch(&s, "midway", Some("main")).unwrap();
        }
    }
    sync(&mut a, &mut b, &uid);
    let before = (showing(&a, "main"), showing(&a, "midway"));
    assert_eq!((showing(&b, "main"), showing(&b, "midway")), before);
    assert_eq!(get(&a.engine, &alknet_actors::engine::Scope::new("default", "midway"), "/hot"), Some(b"hot 280".to_vec()));
    let bytes_before = shard_bytes(&a, &uid);

    let base = a.mesh.compact(&mut a.engine, &uid).unwrap();
    assert_eq!(base.epoch, 1);
    assert_eq!(b.mesh.take_epoch(&mut b.engine, &uid, &base).unwrap(), mesh_epoch::TakenEpoch::Derived);
    assert_eq!(a.mesh.summary(&a.engine, &uid).unwrap(), b.mesh.summary(&b.engine, &uid).unwrap(), "both derived the same documents");
    assert_eq!(sync(&mut a, &mut b, &uid), 0, "nothing to send after the epoch");
    let bytes_after = shard_bytes(&a, &uid);
    assert!(bytes_after * 5 < bytes_before, "shards {bytes_before} bytes before, {bytes_after} after");
    assert_eq!((showing(&a, "main"), showing(&a, "midway")), before);
    assert_eq!((showing(&b, "main"), showing(&b, "midway")), before);
    // Taken again (another member announces it too): nothing changes.
    assert_eq!(b.mesh.take_epoch(&mut b.engine, &uid, &base).unwrap(), mesh_epoch::TakenEpoch::Ignored);

    put(&mut b.engine, &s, "/hot", b"after the epoch");
    sync(&mut a, &mut b, &uid);
    assert_eq!(showing(&a, "main"), showing(&b, "main"));
    assert_ne!(showing(&a, "main"), before.0, "b's write after the epoch reached a");
    assert!(shard_bytes(&a, &uid) < bytes_before / 4);
}

/// A member away while the others compacted keeps what it wrote meanwhile: it cannot derive
/// the epoch (it lacks the heads), so it starts it from nothing, receives the documents and
/// puts back its own writes past the cut; the others get them. A node that joins afterwards
/// shows what everyone shows, conflicts included: nothing stale came back.
#[test]
fn a_member_away_during_an_epoch_keeps_its_writes_and_a_later_joiner_sees_the_same() {
    let (mut a, mut b, mut c) = (Node::new(), Node::new(), Node::new());
    let uid = join(&mut a, &mut b);
    let (cuid, secret) = a.mesh.invite(&mut a.engine, "default", (3_600_000, 1, alknet_actors::proto::membership::Role::Writer), &[]).unwrap();
    assert_eq!(cuid, uid);
    let (name, root) = a.mesh.admit(&mut a.engine, &uid, &secret, &c.me(), &[]).unwrap().unwrap();
    c.mesh.adopt(&mut c.engine, &adoption(name, uid, root, a.me())).unwrap();
    let s = main_scope();
    for i in 0..50 {
        put(&mut a.engine, &s, "/hot", format!("hot {i}").as_bytes());
        // The first of these made /deep and /deep/er in the same operation: the epoch keeps
        // the directories and not that operation's first file, and a joiner shows them.
        put(&mut a.engine, &s, "/deep/er/file", format!("deep {i}").as_bytes());
    }
    // Rounds until the three agree: a node that applied a file before its directories
    // arrived repaired them with versions of its own, which the others take later.
    for round in 0.. {
        sync(&mut a, &mut b, &uid);
        sync(&mut a, &mut c, &uid);
        if showing(&b, "main") == showing(&a, "main") && showing(&c, "main") == showing(&a, "main") {
            break;
        }
        assert!(round < 5, "the three did not agree after {round} rounds");
    }
    // C goes away and writes; A and B go on and compact.
    put(&mut c.engine, &s, "/away.txt", b"written while away");
    put(&mut c.engine, &s, "/hot", b"c's hot, while away");
    for i in 50..100 {
        put(&mut a.engine, &s, "/hot", format!("hot {i}").as_bytes());
    }
    sync(&mut a, &mut b, &uid);
    let base = a.mesh.compact(&mut a.engine, &uid).unwrap();
    assert_eq!(b.mesh.take_epoch(&mut b.engine, &uid, &base).unwrap(), mesh_epoch::TakenEpoch::Derived);
    // C comes back.
    c.mesh.publish(&mut c.engine).unwrap();
    assert_eq!(c.mesh.take_epoch(&mut c.engine, &uid, &base).unwrap(), mesh_epoch::TakenEpoch::FromNothing);
    // Rounds until the three agree (repairs, as above; which shard arrives first depends on
    // the branch's random id).
    for round in 0.. {
        sync(&mut c, &mut a, &uid);
        sync(&mut a, &mut b, &uid);
        if showing(&b, "main") == showing(&a, "main") && showing(&c, "main") == showing(&a, "main") {
            break;
        }
        assert!(round < 5, "the three did not agree after {round} rounds");
    }
    let away = showing(&c, "main").0.into_iter().find(|(path, _)| path == "/away.txt").expect("c shows its own write");
    for n in [&a, &b] {
        assert!(showing(n, "main").0.contains(&away), "{} shows c's write while away", n.me().short());
    }
    assert_eq!(showing(&a, "main"), showing(&c, "main"));
    assert_eq!(showing(&a, "main"), showing(&b, "main"));
    assert!(!showing(&a, "main").1.is_empty(), "c's /hot while away and a's later ones are listed as a conflict");
    // A joiner now: from nothing, the documents whole.
    let mut d = Node::new();
    join(&mut a, &mut d);
    assert_eq!(d.mesh.take_epoch(&mut d.engine, &uid, &base).unwrap(), mesh_epoch::TakenEpoch::FromNothing);
    // The joiner may repair directories whose files reached it first: rounds until the two
    // agree.
    for round in 0.. {
        sync(&mut a, &mut d, &uid);
        if showing(&d, "main") == showing(&a, "main") {
            break;
        }
        assert!(round < 5, "the joiner did not agree after {round} rounds: {:?} / {:?}", showing(&d, "main"), showing(&a, "main"));
    }
    assert!(showing(&d, "main").0.iter().any(|(path, _)| path == "/deep/er"), "the joiner shows the directories of an operation the epoch kept in part");
    assert_eq!(count_rows(&d, "mesh_held"), 0, "the genesis's part of an operation is applied, not held for the rest");
}
