//! The node's identity: the secret key in `DATA/node.key`. Its public half is the node id,
//! which names the node in the mesh (its iroh endpoint) and in every version it writes, so
//! the store and the CLI need it as much as the network does: it is created with the store.
//!
//! The key is created with mode 0600 from its first byte, written in full and fsynced under a
//! temporary name, then renamed into place and the directory fsynced: no moment where another
//! user could read it, and no power loss that leaves half a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::proto::ids::NodeId;

/// The node's secret key file inside the data dir.
pub const NODE_KEY_FILE: &str = "node.key";

/// Errors reading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file is there but is not a key.
    #[error("{0} is damaged (not 32 bytes): restore it from a backup; removing it makes this store a new node")]
    Damaged(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The node's secret key, read from `dir`, or created there if the store has none yet.
pub fn load_or_create(dir: &Path) -> Result<iroh::SecretKey, IdentityError> {
    let path = dir.join(NODE_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| IdentityError::Damaged(path.clone()))?;
            Ok(iroh::SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = iroh::SecretKey::generate();
            write_secret(dir, &path, &key.to_bytes())?;
            Ok(key)
        }
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

/// The node id of a secret key.
pub fn node_id(key: &iroh::SecretKey) -> NodeId {
    NodeId(*key.public().as_bytes())
}

/// Writes `bytes` to `path` (in `dir`) readable by the owner alone from the start, durably.
fn write_secret(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let tmp = dir.join(format!("{NODE_KEY_FILE}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { path, source }
    };
    let _ = std::fs::remove_file(&tmp); // a leftover of an interrupted first start
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    // The umask may only take bits away; make sure of exactly 0600 all the same.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}
