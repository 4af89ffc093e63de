//! What must hold of a simulated mesh: checked after every delivery (no node shows half an
//! operation; no head is a version replaced knowingly) and at quiescence (every running
//! member shows the same tree and conflicts on every branch; every acknowledged write of a
//! member is everywhere with its bytes; nothing a membership rule refuses is held; no entry
//! names a blob no node holds).

use std::collections::BTreeSet;

use alknet_actors::proto::entry::ContentHash;
use alknet_actors::proto::ids::Uid;
use alknet_actors::proto::path::TreePath;

use super::{Sim, Violation, VIOLATIONS_KEPT, MAIN};
use crate::node::Broken;

impl Sim {
    /// Records a violation (it fails the run) and marks the trace.
    pub(super) fn violation(&mut self, what: String) {
        self.trace.add(b"violation");
        self.stats.violations += 1;
        // The first ones say what went wrong; a broken rule repeats itself thousands of times.
        if self.violations.len() < VIOLATIONS_KEPT {
            self.violations.push(Violation { at_ms: self.now, what });
        }
    }

    /// No node shows part of a commit: a rename's two versions arrive together or not at all.
    pub(super) fn check_whole(&mut self, n: usize, applied: &[alknet_actors::proto::replica::Change]) {
        let mut found = Vec::new();
        for c in applied {
            if let Some(group) = self.commits.get(&c.id()) {
                if let Some(absent) = group.iter().find(|id| !self.nodes[n].tree().contains(id)) {
                    found.push(format!("node {n} shows version {} of a commit without its version {absent} (half a rename)", c.id()));
                }
            }
        }
        for what in found {
            self.violation(what);
        }
    }

    /// The continuous check after a change reached node `n`: no head it shows at `paths` is
    /// a version another version there replaced knowingly (causal last-writer-wins).
    pub(super) fn check_paths(&mut self, n: usize, paths: Vec<(Uid, TreePath)>) {
        for (branch, path) in paths {
            let tree = self.nodes[n].tree();
            let Some(head) = tree.head(&branch, &path) else { continue };
            // What the node shows: the rule's head, unless a rule is broken on purpose.
            let listing_head = if self.broken == Some(Broken::ArrivalOrder) && branch == MAIN { self.nodes[n].shows(&path) } else { head.version.entry.clone() };
            let head_id = head.id();
            let mut found = Vec::new();
            // Replaced knowingly: some version names it as what it replaced.
            if tree.versions(&branch, &path).iter().any(|c| c.pred == Some(head_id)) {
                found.push(format!("node {n} shows {path:?} as version {head_id}, which a later version of it replaced knowingly"));
            }
            if listing_head != head.version.entry {
                found.push(format!("node {n} shows {path:?} as {listing_head:?}, the rule's head is {:?}", head.version.entry));
            }
            for what in found {
                self.violation(what);
            }
        }
    }

    /// The blobs node `n` lacks that one of `active` holds (so it can still get them).
    pub(super) fn reachable_missing(&self, n: usize, active: &[usize]) -> Vec<ContentHash> {
        self.nodes[n].missing_blobs().into_iter().filter(|h| active.iter().any(|&a| self.nodes[a].disk.blobs.contains(h))).collect()
    }

    /// The nodes a run's end is judged on: running, and members as node 0 (the founder, never
    /// removed by the workloads) holds the bucket's document.
    pub(super) fn active(&self) -> Vec<usize> {
        let founder = &self.nodes[0];
        (0..self.nodes.len()).filter(|&n| self.nodes[n].up && founder.admits(&self.nodes[n].id)).collect()
    }

    /// What must hold once the mesh is quiet: every running node shows the same tree and
    /// lists the same conflicts; every acknowledged write is on every node; every version's
    /// bytes are on every node (so a losing version is restorable everywhere).
    pub fn check_quiet(&mut self) {
        let up = self.active();
        let Some(&first) = up.first() else { return };
        let listing = self.nodes[first].listing();
        let conflicts = self.nodes[first].conflicts();
        for &n in &up[1..] {
            if self.nodes[n].listing() != listing {
                let what = format!("node {n} shows a different tree from node {first}: {:?} vs {:?}", self.tree(n).keys().collect::<Vec<_>>(), self.tree(first).keys().collect::<Vec<_>>());
                self.violation(what);
            }
            if self.nodes[n].conflicts() != conflicts {
                self.violation(format!("node {n} lists different conflicts from node {first}"));
            }
        }
        // Every other branch alike, read through its ancestors.
        let branches: Vec<(Uid, String)> = self.nodes[first].branches().values().filter(|b| b.uid != MAIN).map(|b| (b.uid, b.name.clone())).collect();
        for (uid, name) in branches {
            let (listing, conflicts) = (self.nodes[first].listing_of(&uid), self.nodes[first].conflicts_of(&uid));
            for &n in &up[1..] {
                if self.nodes[n].listing_of(&uid) != listing {
                    self.violation(format!("node {n} shows branch {name} differently from node {first}"));
                }
                if self.nodes[n].conflicts_of(&uid) != conflicts {
                    self.violation(format!("node {n} lists different conflicts on branch {name} from node {first}"));
                }
            }
        }
        // Writes of members; a removed member's writes that reached nobody before its
        // removal are gone with it, by design.
        let acked: Vec<_> = self.acked.iter().filter(|(w, _)| up.contains(w)).cloned().collect();
        let members: BTreeSet<_> = up.iter().map(|&n| self.nodes[n].id).collect();
        for &n in &up {
            for (writer, id) in &acked {
                if !self.nodes[n].tree().contains(id) {
                    self.violation(format!("node {n} lacks version {id}, acknowledged by node {writer}"));
                }
            }
            let founder = &self.nodes[0];
            let foreign = self.nodes[n].tree().changes().filter(|c| !members.contains(&c.key.version().node) && !founder.accepts(&c.id())).count();
            if foreign > 0 {
                self.violation(format!("node {n} holds {foreign} versions the bucket's membership refuses (a stranger's, a removed member's past what its remover had seen, or a node a removed member admitted)"));
            }
            // Bytes still on an active node must have arrived; bytes no active node holds were
            // written by a member removed before they spread (still held by it: no entry names
            // a blob that no node holds).
            let missing = self.reachable_missing(n, &up);
            if !missing.is_empty() {
                self.violation(format!("node {n} lacks the bytes of {} versions that other members hold", missing.len()));
            }
            for h in self.nodes[n].missing_blobs() {
                if !self.nodes.iter().any(|node| node.disk.blobs.contains(&h)) {
                    self.violation(format!("node {n} names blob {h} that no node holds"));
                }
            }
            let paths: BTreeSet<(Uid, TreePath)> = self.nodes[n].tree().changes().map(|c| (c.branch, c.path.clone())).collect();
            self.check_paths(n, paths.into_iter().collect());
        }
    }
}
