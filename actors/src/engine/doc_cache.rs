//! The shared buckets' documents in memory: loaded on demand, and the least recently used
//! dropped once their estimated size passes a budget (`node.doc_cache_mib`). A document in
//! memory is always saved (every change to one is saved in the transaction that made it), so
//! dropping one loses nothing: the next use reads it back from `tree.db`.
//!
//! What a document costs in memory is estimated from what it costs saved
//! ([`MEMORY_PER_SAVED_BYTE`], measured): automerge does not say.

use std::collections::HashMap;

use crate::proto::doc::ReplicaDoc;

/// Bytes of memory a loaded document takes per byte of its saved form (full save and
/// increments): 3.4 measured at 100,000 paths (`cargo bench --bench mesh_scale`, the heap in
/// use before and after every document is loaded), rounded up.
pub const MEMORY_PER_SAVED_BYTE: usize = 4;

/// The budget when none is configured.
pub const BUDGET_DEFAULT_BYTES: usize = 128 << 20;

/// A document kept, with what it costs and when it was last used.
struct Kept {
    doc: ReplicaDoc,
    /// Its saved size, bytes.
    saved: usize,
    /// The use clock at its last use.
    used: u64,
}

/// Documents in memory by (bucket id, document).
pub struct DocCache {
    docs: HashMap<(i64, u16), Kept>,
    clock: u64,
    /// The saved size of every document kept, summed.
    saved: usize,
    /// The most memory the documents kept may take (estimated), bytes.
    budget: usize,
}

impl Default for DocCache {
    fn default() -> Self {
        DocCache { docs: HashMap::new(), clock: 0, saved: 0, budget: BUDGET_DEFAULT_BYTES }
    }
}

impl DocCache {
    /// Sets the budget (bytes of memory); [`trim`](Self::trim) keeps to it.
    pub fn set_budget(&mut self, bytes: usize) {
        self.budget = bytes;
    }

    /// Whether the document is in memory.
    pub fn contains_key(&self, key: &(i64, u16)) -> bool {
        self.docs.contains_key(key)
    }

    /// The document, if in memory; counts as a use.
    pub fn get_mut(&mut self, key: &(i64, u16)) -> Option<&mut ReplicaDoc> {
        self.clock += 1;
        let clock = self.clock;
        self.docs.get_mut(key).map(|k| {
            k.used = clock;
            &mut k.doc
        })
    }

    /// Keeps `doc`, `saved` bytes when saved.
    pub fn insert(&mut self, key: (i64, u16), doc: ReplicaDoc, saved: usize) {
        self.clock += 1;
        self.saved += saved;
        if let Some(old) = self.docs.insert(key, Kept { doc, saved, used: self.clock }) {
            self.saved -= old.saved;
        }
    }

    /// Drops the document (it is read back from the database when next used).
    pub fn remove(&mut self, key: &(i64, u16)) {
        if let Some(old) = self.docs.remove(key) {
            self.saved -= old.saved;
        }
    }

    /// The document's saved form grew by `bytes` (an increment).
    pub fn grew(&mut self, key: &(i64, u16), bytes: usize) {
        if let Some(k) = self.docs.get_mut(key) {
            k.saved += bytes;
            self.saved += bytes;
        }
    }

    /// The document's saved size is now `saved` bytes (a full save).
    pub fn saved_as(&mut self, key: &(i64, u16), saved: usize) {
        if let Some(k) = self.docs.get_mut(key) {
            self.saved = self.saved - k.saved + saved;
            k.saved = saved;
        }
    }

    /// Documents in memory.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The memory the documents kept take, estimated (bytes).
    pub fn bytes(&self) -> usize {
        self.saved.saturating_mul(MEMORY_PER_SAVED_BYTE)
    }

    /// Drops the least recently used documents until the rest fit the budget; a document
    /// holding changes whose dependencies have not arrived stays (automerge keeps those in
    /// memory only). Call between operations, never while one holds a document. Returns how
    /// many were dropped.
    pub fn trim(&mut self) -> usize {
        if self.bytes() <= self.budget {
            return 0;
        }
        let mut order: Vec<((i64, u16), u64)> = self.docs.iter().map(|(k, v)| (*k, v.used)).collect();
        order.sort_by_key(|(_, used)| *used);
        let mut dropped = 0;
        for (key, _) in order {
            if self.bytes() <= self.budget {
                break;
            }
            let waits = self.docs.get_mut(&key).is_some_and(|k| k.doc.waits_for_dependencies());
            if !waits {
                self.remove(&key);
                dropped += 1;
            }
        }
        dropped
    }
}
