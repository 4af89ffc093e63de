//! Where the CLI's writes go: to the running node through its socket when one answers,
//! otherwise straight into the engine (which takes the data dir's lock). Both paths return
//! the same values, so every command prints the same thing either way.

use std::io::Read;
use std::path::Path;

use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::gc::{GcReport, Retention};
use alknet_actors::proto::ids::VersionRef;
use alknet_actors::proto::path::TreePath;
use alknet_actors::store::merge::MergeReport;
use alknet_actors::store::Branch;
use anyhow::{bail, Context, Result};

use crate::control::client::Client;
use crate::control::{Reply, Request, WireScope};

/// A place to send writes.
pub enum Writer {
    /// This process writes (it holds the lock). Boxed: an engine is much larger than a client.
    Direct(Box<Engine>),
    /// The running node writes.
    Node(Client),
}

fn wire(scope: &Scope) -> WireScope {
    WireScope { bucket: scope.bucket.clone(), branch: scope.branch.clone() }
}

fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from the node: {reply:?}")
}

impl Writer {
    /// The node of `dir` if one runs, else the engine.
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some(client) = Client::connect(dir) {
            return Ok(Writer::Node(client));
        }
        let bound = crate::config::Config::load(dir, &[])?.clock_bound();
        Ok(Writer::Direct(Box::new(Engine::open(dir, Access::Write)?.with_clock_bound(bound))))
    }

    fn seq(reply: Reply) -> Result<i64> {
        match reply {
            Reply::Seq { seq } => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Stores a local file.
    pub fn put_file(&mut self, scope: &Scope, src: &Path, dest: &TreePath, progress: impl FnMut(u64)) -> Result<i64> {
        match self {
            Writer::Direct(e) => Ok(e.put_file(scope, src, dest, progress)?),
            Writer::Node(c) => {
                // The node has its own working directory: send an absolute path.
                let src = std::path::absolute(src).with_context(|| src.display().to_string())?;
                Self::seq(c.call(&Request::PutFile { scope: wire(scope), path: dest.to_string(), src })?)
            }
        }
    }

    /// Stores what `reader` yields.
    pub fn put_reader(&mut self, scope: &Scope, reader: impl Read, dest: &TreePath, progress: impl FnMut(u64)) -> Result<i64> {
        match self {
            Writer::Direct(e) => Ok(e.put_reader(scope, reader, dest, progress)?),
            Writer::Node(c) => Self::seq(c.call_streaming(&Request::PutStream { scope: wire(scope), path: dest.to_string() }, reader)?),
        }
    }

    /// Stores a local directory tree.
    pub fn put_tree(&mut self, scope: &Scope, src: &Path, dest: &TreePath, progress: impl FnMut(u64)) -> Result<u64> {
        match self {
            Writer::Direct(e) => Ok(e.put_tree(scope, src, dest, progress)?),
            Writer::Node(c) => {
                let src = std::path::absolute(src).with_context(|| src.display().to_string())?;
                match c.call(&Request::PutTree { scope: wire(scope), path: dest.to_string(), src })? {
                    Reply::Count { count } => Ok(count),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    /// Removes a path.
    pub fn remove(&mut self, scope: &Scope, path: &TreePath, recursive: bool) -> Result<u64> {
        match self {
            Writer::Direct(e) => Ok(e.remove(scope, path, recursive)? as u64),
            Writer::Node(c) => match c.call(&Request::Remove { scope: wire(scope), path: path.to_string(), recursive })? {
                Reply::Count { count } => Ok(count),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Renames; returns where the path ended up.
    pub fn rename(&mut self, scope: &Scope, from: &TreePath, to: &TreePath) -> Result<TreePath> {
        match self {
            Writer::Direct(e) => Ok(e.rename(scope, from, to)?),
            Writer::Node(c) => match c.call(&Request::Rename { scope: wire(scope), from: from.to_string(), to: to.to_string() })? {
                Reply::Path { path } => Ok(TreePath::parse(&path)?),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Makes a directory.
    pub fn mkdir(&mut self, scope: &Scope, path: &TreePath, parents: bool) -> Result<()> {
        match self {
            Writer::Direct(e) => Ok(e.mkdir(scope, path, parents)?),
            Writer::Node(c) => c.call(&Request::Mkdir { scope: wire(scope), path: path.to_string(), parents, mode: None }).map(|_| ()),
        }
    }

    /// Restores a version; returns the new version.
    pub fn restore(&mut self, scope: &Scope, path: &TreePath, version: &VersionRef) -> Result<i64> {
        match self {
            Writer::Direct(e) => Ok(e.restore(scope, path, version)?),
            Writer::Node(c) => Self::seq(c.call(&Request::Restore { scope: wire(scope), path: path.to_string(), version: version.to_string() })?),
        }
    }

    /// Creates a branch.
    pub fn create_branch(&mut self, scope: &Scope, name: &str, from: Option<&str>) -> Result<Branch> {
        match self {
            Writer::Direct(e) => Ok(e.create_branch(scope, name, from)?),
            Writer::Node(c) => match c.call(&Request::BranchCreate { scope: wire(scope), name: name.into(), from: from.map(Into::into) })? {
                Reply::Branch { branch } => Ok(branch),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Deletes a branch.
    pub fn delete_branch(&mut self, scope: &Scope, name: &str) -> Result<()> {
        match self {
            Writer::Direct(e) => Ok(e.delete_branch(scope, name)?),
            Writer::Node(c) => c.call(&Request::BranchDelete { scope: wire(scope), name: name.into() }).map(|_| ()),
        }
    }

    /// Creates a bucket.
    pub fn create_bucket(&mut self, name: &str) -> Result<()> {
        match self {
            Writer::Direct(e) => Ok(e.create_bucket(name)?),
            Writer::Node(c) => c.call(&Request::BucketCreate { name: name.into() }).map(|_| ()),
        }
    }

    /// Merges.
    pub fn merge(&mut self, scope: &Scope, from: &str, into: Option<&str>) -> Result<MergeReport> {
        match self {
            Writer::Direct(e) => Ok(e.merge(scope, from, into)?),
            Writer::Node(c) => match c.call(&Request::Merge { scope: wire(scope), from: from.into(), into: into.map(Into::into) })? {
                Reply::Merge { report } => Ok(report),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Collects garbage: the configured retention (`configured`, from the data dir's config;
    /// a running node uses its own), with `gc`'s flags applied the one way
    /// ([`Retention::with_flags`]).
    pub fn gc(&mut self, configured: Retention, keep_versions: Option<u32>, keep_days: Option<u32>) -> Result<GcReport> {
        match self {
            Writer::Direct(e) => Ok(e.gc(configured.with_flags(keep_versions, keep_days))?),
            Writer::Node(c) => match c.call(&Request::Gc { keep_versions, keep_days })? {
                Reply::Gc { report } => Ok(report),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Takes the conflict at `path` (all, without one) off the branch's list; returns how many.
    pub fn dismiss_conflicts(&mut self, scope: &Scope, path: Option<&TreePath>) -> Result<u64> {
        match self {
            Writer::Direct(e) => Ok(e.dismiss_conflicts(scope, path)? as u64),
            Writer::Node(c) => match c.call(&Request::ConflictsDismiss { scope: wire(scope), path: path.map(|p| p.to_string()) })? {
                Reply::Count { count } => Ok(count),
                other => Err(unexpected(other)),
            },
        }
    }

    /// Indexes pending blobs into iroh-blobs (the node does this by itself).
    pub fn index_blobs(&mut self) -> Result<alknet_actors::engine::BlobReport> {
        match self {
            Writer::Direct(engine) => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let index = alknet_actors::index::BlobIndex::open(engine.dir()).await?;
                    let report = engine.index_blobs(&index).await;
                    index.shutdown().await?;
                    anyhow::Ok(report?)
                })
            }
            Writer::Node(_) => bail!("a node is running and indexes blobs by itself: see `alkfs status` for what is pending"),
        }
    }
}
