//! How results are printed: plain text for people, `--json` for programs.

use std::io::Write;

use alknet_actors::engine::Engine;
use alknet_actors::proto::entry::EntryKind;
use alknet_actors::store::merge::{ConflictRow, MergeReport};
use alknet_actors::store::VersionRow;
use anyhow::Result;
use serde_json::json;

fn kind_name(row: &VersionRow) -> &'static str {
    match row.entry().map(|e| e.kind) {
        Some(EntryKind::File) => "file",
        Some(EntryKind::Dir) => "dir",
        Some(EntryKind::Symlink) => "symlink",
        None => "deleted",
    }
}

fn row_json(name: &str, row: &VersionRow) -> serde_json::Value {
    let e = row.entry();
    json!({
        "name": name,
        "path": row.path.as_str(),
        "kind": kind_name(row),
        "size": e.map(|e| e.size),
        "mode": e.map(|e| format!("{:o}", e.mode)),
        "mtime_ms": e.map(|e| e.mtime_ms),
        "hash": e.map(|e| e.hash.to_hex()),
        "version": row.id().to_string(),
        "written_ms": row.version.written.ms,
        "origin": row.origin,
    })
}

fn time(ms: i64) -> String {
    // ISO-8601 UTC without a date library: days from the epoch to a civil date.
    let (secs, days) = (ms.div_euclid(1000), ms.div_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// `ls`.
pub fn list(out: &mut impl Write, rows: &[VersionRow], long: bool, json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = rows.iter().map(|r| row_json(r.path.name(), r)).collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
        return Ok(());
    }
    for row in rows {
        let name = row.path.name();
        let e = row.entry().expect("ls lists live entries");
        let suffix = if e.kind == EntryKind::Dir { "/" } else { "" };
        if long {
            let k = match e.kind {
                EntryKind::File => '-',
                EntryKind::Dir => 'd',
                EntryKind::Symlink => 'l',
            };
            writeln!(out, "{k} {:04o} {:>12} {} v{:<8} {name}{suffix}", e.mode, e.size, time(e.mtime_ms), row.id().to_string())?;
        } else {
            writeln!(out, "{name}{suffix}")?;
        }
    }
    Ok(())
}

/// Plain `ls`: one name a line, directories marked with `/` (as `list` prints them).
pub fn names(out: &mut impl Write, names: &[(String, EntryKind)]) -> Result<()> {
    for (name, kind) in names {
        let suffix = if *kind == EntryKind::Dir { "/" } else { "" };
        writeln!(out, "{name}{suffix}")?;
    }
    Ok(())
}

/// `log`.
pub fn log(out: &mut impl Write, engine: &Engine, rows: &[VersionRow], json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = rows.iter().map(|r| row_json(r.path.name(), r)).collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
        return Ok(());
    }
    for row in rows {
        let branch = engine.tree().branch_by_id(row.branch_id).map(|b| b.name).unwrap_or_else(|_| "?".into());
        let what = match row.entry() {
            Some(e) => format!("{:<7} {:>12} {}", kind_name(row), e.size, &e.hash.to_hex()[..16]),
            None => format!("{:<7} {:>12} {}", "deleted", "-", "-"),
        };
        writeln!(out, "v{:<16} {} {what} {:<14} on {branch}", row.id().to_string(), time(row.version.written.ms), row.origin)?;
    }
    Ok(())
}

/// Where a branch forked: its fork stamp's time, or (a fork an older alkfs made) the local
/// version it forked at.
pub fn fork_point(b: &alknet_actors::store::Branch) -> String {
    match b.fork_key {
        Some(key) => time(key.stamp().ms),
        None => format!("local version {}", b.fork_seq),
    }
}

/// `merge`.
pub fn merge(out: &mut impl Write, from: &str, into: &str, r: &MergeReport) -> Result<()> {
    let how = if r.fast_forward { "fast-forward" } else { "three-way" };
    writeln!(out, "merged {from} into {into} ({how}): {} paths taken, {} conflicts", r.taken.len(), r.conflicts.len())?;
    for (path, winner) in &r.conflicts {
        writeln!(out, "conflict {path}: kept the {winner:?} side's version (last writer wins); see `alkfs conflicts`")?;
    }
    Ok(())
}

/// A version's id as printed; "-" for one retention has dropped.
fn shown(id: Option<alknet_actors::proto::ids::VersionId>) -> String {
    id.map_or_else(|| "-".to_string(), |id| id.to_string())
}

/// `conflicts`.
pub fn conflicts(out: &mut impl Write, rows: &[ConflictRow], json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = rows
            .iter()
            .map(|c| json!({"path": c.path, "from_branch": c.from_branch, "winner_version": shown(c.winner), "loser_version": shown(c.loser), "at_ms": c.at_ms}))
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
        return Ok(());
    }
    for c in rows {
        let how = match c.from_branch.strip_prefix('@') {
            Some(node) => format!("written concurrently on node {node}"),
            None => format!("merged from {}", c.from_branch),
        };
        writeln!(
            out,
            "{}\t{how} at {}: kept v{}, lost v{} (alkfs restore {} --version {})",
            c.path, time(c.at_ms), shown(c.winner), shown(c.loser), c.path, shown(c.loser)
        )?;
    }
    Ok(())
}

/// `ls -R`: one line per entry (path, kind, size, hash), parents before children.
pub fn walk(out: &mut impl Write, rows: &[VersionRow], json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = rows.iter().map(|r| row_json(r.path.name(), r)).collect();
        writeln!(out, "{}", serde_json::Value::Array(items))?;
        return Ok(());
    }
    for row in rows {
        let e = row.entry().expect("walks list live entries");
        writeln!(out, "{}\t{}\t{}\t{}", row.path, kind_name(row), e.size, e.hash.to_hex())?;
    }
    Ok(())
}

/// `members`.
pub fn members(out: &mut impl Write, members: &[alknet_actors::engine::mesh::Member], members_invite: bool, me: &alknet_actors::proto::ids::NodeId, json: bool) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(members)?)?;
        return Ok(());
    }
    if members.is_empty() {
        writeln!(out, "this bucket is not shared: `alkfs invite` makes a ticket for another node")?;
        return Ok(());
    }
    let who = if members_invite { "owners and writers (`alkfs members invites owners` to change)" } else { "owners (`alkfs members invites writers` lets writers too)" };
    writeln!(out, "who may invite: {who}")?;
    for m in members {
        let state = match m.removed_ms {
            Some(at) => format!("removed {}", time(at)),
            None => format!("member since {}", time(m.added_ms)),
        };
        let this = if m.node == *me { " (this node)" } else { "" };
        let addrs: Vec<String> = m.addrs.iter().map(|a| a.to_string()).collect();
        let role = m.role.map_or("-", |r| r.as_str());
        writeln!(out, "{}  {role:<9}  {state}  {}{this}", m.node, addrs.join(","))?;
    }
    Ok(())
}

/// `status`.
pub fn status(out: &mut impl Write, s: &crate::control::Status, json: bool) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(s)?)?;
        return Ok(());
    }
    writeln!(out, "node id:    {}", s.node_id)?;
    writeln!(out, "pid:        {}   uptime: {} s", s.pid, s.uptime_secs)?;
    writeln!(out, "data dir:   {} ({} bytes on disk)", s.data_dir.display(), s.store_bytes)?;
    writeln!(out, "blobs:      {} named ({} still on peers); {} pending index, {} indexed this run, {} failed", s.blob_count, s.blobs_missing, s.blobs.pending, s.blobs.indexed, s.blobs.failed)?;
    writeln!(out, "outbox:     cursor {} of {}", s.outbox_cursor, s.outbox_head)?;
    for c in &s.consumers {
        let state = if c.expired { "expired: idle past gc.outbox_keep_days, holds nothing back" } else { "active" };
        writeln!(out, "  consumer {:<12} cursor {:<8} last seen {}  {state}", c.name, c.cursor, time(c.seen_ms))?;
    }
    match &s.last_gc {
        Some((at, r)) => writeln!(out, "last gc:    {}: freed {} blobs ({} bytes), pruned {} versions, {} ms", time(*at), r.blobs_freed, r.bytes_freed, r.versions_pruned, r.took_ms)?,
        None => writeln!(out, "last gc:    not yet")?,
    }
    writeln!(out, "actors:")?;
    for a in &s.actors {
        let failure = a.last_failure.as_deref().map(|f| format!("  last failure: {f}")).unwrap_or_default();
        writeln!(out, "  {:<16} {:<10} restarts {}{failure}", a.name, a.state, a.restarts)?;
    }
    if let Some(m) = &s.mesh {
        writeln!(out, "listening:  {}", m.listen.join(", "))?;
        writeln!(out, "fetches:    {} pending, {} failed (retrying), {} fetched", m.pending_fetches, m.failed_fetches, m.fetched)?;
        if m.unavailable_blobs > 0 {
            writeln!(out, "unavailable: {} blobs no connected peer can serve (freed by their GC, or never there); asked for again every hour at most", m.unavailable_blobs)?;
        }
        writeln!(out, "gossip:     {} topics, {} neighbours", m.gossip_topics, m.gossip_neighbors)?;
        let f = m.frames;
        writeln!(out, "sync:       {} frames sent, {} received ({} brought something)", f.sent, f.received, f.useful)?;
        for e in &m.epochs {
            writeln!(out, "bucket {}: shards at epoch {}, {} KiB saved ({} KiB when it began)", e.bucket, e.epoch, e.shard_bytes >> 10, e.began_bytes >> 10)?;
        }
        writeln!(out, "peers:")?;
        for p in &m.peers {
            let state = if p.connected { format!("connected ({}, rtt {} ms)", p.path, p.rtt_ms.unwrap_or(0)) } else { format!("not connected ({} failed dials)", p.failures) };
            let last = p.last_sync_ms.map(time).unwrap_or_else(|| "never".into());
            let clock = match p.clock_offset_ms {
                Some(ms) if ms.abs() >= 1000 => format!("  clock {}{} s", if ms > 0 { "+" } else { "-" }, ms.abs() / 1000),
                _ => String::new(),
            };
            writeln!(out, "  {}  {state}  last sync {last}  lag {} docs  {}{clock}", &p.id[..10], p.lag_docs, p.addrs.join(","))?;
        }
        for p in m.peers.iter().filter(|p| p.clock_offset_ms.is_some_and(|ms| -ms > m.clock_bound_ms)) {
            writeln!(
                out,
                "clock:      this node's clock is {} s ahead of peer {}'s, beyond node.clock_offset_max_secs: versions written here wait there until their time. Check this machine's clock (timedatectl, NTP)",
                -p.clock_offset_ms.unwrap_or(0) / 1000,
                &p.id[..10]
            )?;
        }
        for b in &m.bounds_hit {
            writeln!(out, "bound hit:  {} ({}) refused {} times since the node started", b.name, b.limit, b.hits)?;
        }
        for w in &m.clock_waits {
            writeln!(
                out,
                "clock:      {} versions of {} wait: its clock is {} s ahead of this node's, beyond node.clock_offset_max_secs; they apply when their time comes (or fix that machine's clock)",
                w.versions,
                &w.writer[..w.writer.len().min(10)],
                w.ahead_ms / 1000
            )?;
        }
    }
    for b in &s.members {
        writeln!(out, "bucket {}: {} members", b.bucket, b.members.iter().filter(|m| m.removed_ms.is_none()).count())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_iso() {
        assert_eq!(super::time(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::time(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
