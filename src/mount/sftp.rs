//! The SFTP front-end (`alkfs serve sftp`): an SSH server that offers only the `sftp`
//! subsystem, over the same filesystem layer as the FUSE mount.
//!
//! - A client logs in as a **bucket's name** with a public key that `alkfs sftp allow BUCKET
//!   KEY.pub` authorised; the allow list (`DATA/sftp/allowed`) is read at every login, so
//!   `allow` and `revoke` take effect at once. Passwords and every other method are refused.
//! - The host key is made once (`DATA/sftp/host_ed25519`, mode 0600) and kept, so clients
//!   see the same key across restarts.
//! - A user sees only its bucket: paths are resolved lexically against the bucket's root
//!   (`..` stops at the root) and symlinks are followed through the tree, never the host's
//!   filesystem, so neither can lead out of it.
//! - Writes are the mount's write sessions: a file shows its old bytes until the client
//!   closes it; a connection that drops before the close commits nothing.
//! - Shells, commands and port forwarding are refused.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alknet_actors::engine::Scope;
use alknet_actors::proto::entry::EntryKind;
use alknet_actors::proto::path::TreePath;
use anyhow::{bail, Context, Result};
use russh::keys::ssh_key::{HashAlg, LineEnding};
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use russh_sftp::protocol::{Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode, Version};
use russh_sftp::server::StatusReply;

use super::fs::{Attr, Errno, FsResult, MountFs, OpenMode};

/// The directory of the SFTP server's files in the data dir.
const SFTP_DIR: &str = "sftp";
/// The allow list: one `BUCKET KEY-TYPE BASE64 [COMMENT]` line per authorised key.
const ALLOWED_FILE: &str = "allowed";
/// The host key.
const HOST_KEY_FILE: &str = "host_ed25519";
/// Largest read answered at once (clients ask for 32–256 KiB).
const READ_BYTES_MAX: u32 = 256 * 1024;
/// Directory entries per readdir answer.
const READDIR_BATCH: usize = 128;
/// Symlinks followed in one `stat` before giving up (a loop).
const SYMLINK_HOPS_MAX: usize = 16;
/// Handles one SFTP session may hold open (each holds a file or a staging file).
const HANDLES_PER_SESSION_MAX: usize = 256;
/// Sessions (channels) one connection may open.
const CHANNELS_PER_CONNECTION_MAX: usize = 8;

// ---- the allow list ----

/// One authorised key.
#[derive(Clone, Debug)]
pub struct AllowedKey {
    /// The bucket it may log in to.
    pub bucket: String,
    /// The key.
    pub key: PublicKey,
}

fn allowed_path(dir: &Path) -> PathBuf {
    dir.join(SFTP_DIR).join(ALLOWED_FILE)
}

/// Reads the allow list (empty when there is none yet).
pub fn allowed_keys(dir: &Path) -> Result<Vec<AllowedKey>> {
    let path = allowed_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((bucket, key)) = line.split_once(' ') else { bail!("{}:{}: expected `BUCKET KEY`", path.display(), n + 1) };
        let key = PublicKey::from_openssh(key.trim()).with_context(|| format!("{}:{}: not an OpenSSH public key", path.display(), n + 1))?;
        out.push(AllowedKey { bucket: bucket.to_string(), key });
    }
    Ok(out)
}

fn write_allowed(dir: &Path, keys: &[AllowedKey]) -> Result<()> {
    let sftp = dir.join(SFTP_DIR);
    std::fs::create_dir_all(&sftp).with_context(|| sftp.display().to_string())?;
    let mut text = String::from("# alkfs sftp allow list: BUCKET KEY (edit with `alkfs sftp allow` / `revoke`)\n");
    for k in keys {
        text.push_str(&format!("{} {}\n", k.bucket, k.key.to_openssh().context("encoding a key")?));
    }
    let mut tmp = tempfile::Builder::new().prefix(".allowed-").tempfile_in(&sftp)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(allowed_path(dir)).map_err(|e| e.error).context("saving the allow list")?;
    Ok(())
}

fn read_public_key(file: &Path) -> Result<PublicKey> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    PublicKey::from_openssh(text.trim()).with_context(|| format!("{}: not an OpenSSH public key (a .pub file, e.g. from ssh-keygen)", file.display()))
}

/// Lets the key in `pubkey_file` log in to `bucket`. Returns its fingerprint.
pub fn allow(dir: &Path, bucket: &str, pubkey_file: &Path) -> Result<String> {
    let key = read_public_key(pubkey_file)?;
    let reader = alknet_actors::engine::Engine::open(dir, alknet_actors::engine::Access::Read)?;
    reader.tree().bucket_id(bucket).with_context(|| format!("no bucket {bucket:?} here (see `alkfs bucket list`)"))?;
    let mut keys = allowed_keys(dir)?;
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    if !keys.iter().any(|k| k.bucket == bucket && k.key.key_data() == key.key_data()) {
        keys.push(AllowedKey { bucket: bucket.to_string(), key });
        write_allowed(dir, &keys)?;
    }
    Ok(fingerprint)
}

/// Takes a key (a .pub file or its `SHA256:` fingerprint) off `bucket`'s list. Returns how
/// many entries went.
pub fn revoke(dir: &Path, bucket: &str, key: &str) -> Result<usize> {
    let mut keys = allowed_keys(dir)?;
    let before = keys.len();
    let data = if key.starts_with("SHA256:") { None } else { Some(read_public_key(Path::new(key))?.key_data().clone()) };
    keys.retain(|k| {
        let same = match &data {
            Some(d) => k.key.key_data() == d,
            None => k.key.fingerprint(HashAlg::Sha256).to_string() == key,
        };
        !(k.bucket == bucket && same)
    });
    let gone = before - keys.len();
    if gone == 0 {
        bail!("no such key is allowed on bucket {bucket:?} (see `alkfs sftp list`)");
    }
    write_allowed(dir, &keys)?;
    Ok(gone)
}

/// The host key, made (0600) on first use.
fn host_key(dir: &Path) -> Result<PrivateKey> {
    let sftp = dir.join(SFTP_DIR);
    let path = sftp.join(HOST_KEY_FILE);
    if path.exists() {
        return PrivateKey::from_openssh(std::fs::read(&path)?).with_context(|| format!("{}: damaged host key (remove it to make a new one)", path.display()));
    }
    std::fs::create_dir_all(&sftp)?;
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).context("making a host key")?;
    let pem = key.to_openssh(LineEnding::LF).context("encoding the host key")?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).with_context(|| path.display().to_string())?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

// ---- the SSH server ----

/// What every connection shares: the data dir, the branch served, one filesystem layer per
/// bucket.
struct Shared {
    dir: PathBuf,
    branch: String,
    mounts: Mutex<HashMap<String, Arc<MountFs>>>,
}

impl Shared {
    fn allowed(&self, bucket: &str, key: &PublicKey) -> bool {
        match allowed_keys(&self.dir) {
            Ok(keys) => keys.iter().any(|k| k.bucket == bucket && k.key.key_data() == key.key_data()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "sftp: cannot read the allow list; refusing logins");
                false
            }
        }
    }

    fn mount(&self, bucket: &str) -> Result<Arc<MountFs>> {
        let mut mounts = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mounts.get(bucket) {
            return Ok(m.clone());
        }
        let fs = Arc::new(MountFs::open(&self.dir, Scope::new(bucket, &self.branch), false)?);
        mounts.insert(bucket.to_string(), fs.clone());
        Ok(fs)
    }
}

/// Serves SFTP on `listen` until SIGINT/SIGTERM.
pub async fn serve(dir: &Path, branch: &str, listen: SocketAddr) -> Result<()> {
    alknet_actors::engine::Engine::check_initialised(dir)?;
    let key = host_key(dir)?;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256);
    let config = Arc::new(russh::server::Config {
        keys: vec![key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(600)),
        max_auth_attempts: 6,
        nodelay: true,
        // AES-GCM only: ring's AES-GCM runs on the CPU's AES instructions and is several
        // times faster than the ChaCha20-Poly1305 OpenSSH clients pick first when offered
        // (measured: `cargo bench --bench mount`, sftp put/get). Every OpenSSH since 6.2,
        // sshfs and rclone speak it.
        preferred: russh::Preferred { cipher: std::borrow::Cow::Borrowed(&[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM]), ..russh::Preferred::DEFAULT },
        ..Default::default()
    });
    let shared = Arc::new(Shared { dir: dir.to_path_buf(), branch: branch.to_string(), mounts: Mutex::new(HashMap::new()) });
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    eprintln!("serving sftp on {} (host key {fingerprint}); log in as a bucket's name with a key `alkfs sftp allow` authorised", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                tracing::warn!(error = %e, "sftp: accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let handler = Connection { shared: shared.clone(), peer, bucket: None, channels: HashMap::new() };
        let config = config.clone();
        tokio::spawn(async move {
            match russh::server::run_stream(config, socket, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%peer, error = %format!("{e:#}"), "sftp: connection ended");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %format!("{e:#}"), "sftp: handshake failed"),
            }
        });
    }
    eprintln!("sftp server stopped");
    Ok(())
}

/// One SSH connection.
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The bucket it logged in to.
    bucket: Option<String>,
    channels: HashMap<ChannelId, Channel<Msg>>,
}

impl russh::server::Handler for Connection {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(if self.shared.allowed(user, offer.public_key) { Auth::Accept } else { Auth::reject() })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if !self.shared.allowed(user, key.public_key) {
            tracing::info!(peer = %self.peer, bucket = user, "sftp: key refused");
            return Ok(Auth::reject());
        }
        tracing::info!(peer = %self.peer, bucket = user, "sftp: logged in");
        self.bucket = Some(user.to_string());
        Ok(Auth::Accept)
    }

    async fn channel_open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle, _session: &mut Session) -> Result<(), Self::Error> {
        if self.channels.len() >= CHANNELS_PER_CONNECTION_MAX {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(&mut self, id: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        let (Some(bucket), true) = (self.bucket.clone(), name == "sftp") else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let Some(channel) = self.channels.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let shared = self.shared.clone();
        let fs = match tokio::task::spawn_blocking(move || shared.mount(&bucket)).await? {
            Ok(fs) => fs,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "sftp: cannot serve the bucket");
                session.channel_failure(id)?;
                return Ok(());
            }
        };
        session.channel_success(id)?;
        russh_sftp::server::run(channel.into_stream(), SftpSession { fs, handles: HashMap::new(), next: 1 }).await;
        Ok(())
    }

    async fn shell_request(&mut self, id: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    async fn exec_request(&mut self, id: ChannelId, _data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        id: ChannelId,
        _term: &str,
        _col: u32,
        _row: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    async fn channel_close(&mut self, id: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.channels.remove(&id);
        Ok(())
    }
}

// ---- the SFTP session ----

/// An open SFTP handle.
enum SftpHandle {
    File { fh: u64, write: bool },
    Dir { fh: u64, pos: usize },
}

/// One SFTP session on a bucket.
struct SftpSession {
    fs: Arc<MountFs>,
    handles: HashMap<String, SftpHandle>,
    next: u64,
}

impl Drop for SftpSession {
    fn drop(&mut self) {
        // The client went away without closing: uncommitted writes are dropped, as after a
        // crash (the old versions stay).
        for (_, h) in self.handles.drain() {
            match h {
                SftpHandle::File { fh, .. } => self.fs.abandon(fh),
                SftpHandle::Dir { fh, .. } => self.fs.releasedir(fh),
            }
        }
    }
}

fn status(e: Errno) -> StatusReply {
    let code = match e.code {
        libc::ENOENT => StatusCode::NoSuchFile,
        libc::EACCES | libc::EPERM | libc::EROFS => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    if code == StatusCode::Failure {
        tracing::debug!(error = %e, "sftp");
    }
    code.with_message(e.message)
}

fn ok(id: u32) -> Status {
    Status { id, status_code: StatusCode::Ok, error_message: "Ok".into(), language_tag: "en-US".into() }
}

/// `raw` (absolute, or relative to the root, which is every session's working directory)
/// as a path of the bucket: `.` and `..` resolved lexically, never above the root.
fn resolve(raw: &str) -> Result<TreePath, StatusReply> {
    resolve_from(&TreePath::root(), raw)
}

fn resolve_from(base: &TreePath, raw: &str) -> Result<TreePath, StatusReply> {
    let mut parts: Vec<&str> = if raw.starts_with('/') { Vec::new() } else { base.as_str().split('/').filter(|p| !p.is_empty()).collect() };
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    TreePath::parse(&format!("/{}", parts.join("/"))).map_err(|e| status(Errno::from(e)))
}

fn attributes(a: &Attr) -> FileAttributes {
    let type_bits = match a.kind {
        EntryKind::File => 0o100000,
        EntryKind::Dir => 0o040000,
        EntryKind::Symlink => 0o120000,
    };
    let secs = (a.mtime_ms.max(0) / 1000) as u32;
    FileAttributes {
        size: Some(a.size),
        uid: Some(unsafe { libc::getuid() }),
        user: None,
        gid: Some(unsafe { libc::getgid() }),
        group: None,
        permissions: Some(type_bits | (a.mode & 0o7777)),
        atime: Some(secs),
        mtime: Some(secs),
    }
}

impl SftpSession {
    /// Runs a call of the filesystem layer, which blocks (SQLite, files, the node's socket):
    /// in place on this worker thread, whose other tasks move to another meanwhile (cheaper
    /// than a hop to a blocking thread for each 32 KiB write of an upload).
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&MountFs) -> FsResult<T> + Send + 'static) -> Result<T, StatusReply> {
        let fs = self.fs.clone();
        tokio::task::block_in_place(move || f(&fs)).map_err(status)
    }

    fn add(&mut self, h: SftpHandle) -> Result<String, StatusReply> {
        if self.handles.len() >= HANDLES_PER_SESSION_MAX {
            match h {
                SftpHandle::File { fh, .. } => self.fs.abandon(fh),
                SftpHandle::Dir { fh, .. } => self.fs.releasedir(fh),
            }
            return Err(StatusCode::Failure.with_message(format!("too many open handles (at most {HANDLES_PER_SESSION_MAX}): close some")));
        }
        let name = format!("h{}", self.next);
        self.next += 1;
        self.handles.insert(name.clone(), h);
        Ok(name)
    }

    /// `path` with its symlinks followed (through the tree only).
    async fn follow(&self, path: TreePath) -> Result<(TreePath, Attr), StatusReply> {
        let mut path = path;
        for _ in 0..SYMLINK_HOPS_MAX {
            let p = path.clone();
            let attr = self.run(move |fs| fs.stat(&p)).await?;
            if attr.kind != EntryKind::Symlink {
                return Ok((path, attr));
            }
            let p = path.clone();
            let target = self.run(move |fs| fs.readlink(&p)).await?;
            path = resolve_from(&path.parent().unwrap_or_else(TreePath::root), &target)?;
        }
        Err(StatusCode::Failure.with_message("too many levels of symbolic links"))
    }

    fn file_handle(&self, handle: &str) -> Result<u64, StatusReply> {
        match self.handles.get(handle) {
            Some(SftpHandle::File { fh, .. }) => Ok(*fh),
            _ => Err(StatusCode::Failure.with_message("no such file handle")),
        }
    }
}

/// What a setstat changes: mode, mtime, size.
fn changes_of(attrs: &FileAttributes) -> (Option<u32>, Option<i64>, Option<u64>) {
    (attrs.permissions.map(|p| p & 0o7777), attrs.mtime.map(|s| s as i64 * 1000), attrs.size)
}

impl SftpSession {
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(&mut self, _version: u32, _extensions: HashMap<String, String>) -> Result<Version, Self::Error> {
        let mut v = Version::new();
        v.extensions.insert("posix-rename@openssh.com".into(), "1".into());
        v.extensions.insert("fsync@openssh.com".into(), "1".into());
        Ok(v)
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = resolve(&path)?;
        Ok(Name { id, files: vec![File::dummy(p.as_str())] })
    }

    async fn open(&mut self, id: u32, filename: String, pflags: OpenFlags, attrs: FileAttributes) -> Result<Handle, Self::Error> {
        let path = resolve(&filename)?;
        let write = pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE);
        let how = OpenMode {
            read: pflags.contains(OpenFlags::READ),
            write,
            truncate: pflags.contains(OpenFlags::TRUNCATE),
            append: pflags.contains(OpenFlags::APPEND),
            owner: 0,
        };
        let create = pflags.contains(OpenFlags::CREATE);
        let exclusive = pflags.contains(OpenFlags::EXCLUDE);
        let mode = attrs.permissions.map(|p| p & 0o7777).unwrap_or(0o644);
        // A symlink is followed (inside the bucket), as OpenSSH's server does.
        let path = match self.follow(path.clone()).await {
            Ok((p, _)) => p,
            Err(_) => path,
        };
        let fh = self
            .run(move |fs| match fs.stat(&path) {
                Ok(_) if create && exclusive => Err(Errno::new(libc::EEXIST, format!("{path}: already exists"))),
                Ok(_) => fs.open_file(&path, how),
                Err(e) if e.code == libc::ENOENT && create => fs.create(&path, mode, how, exclusive).map(|(fh, _)| fh),
                Err(e) => Err(e),
            })
            .await?;
        Ok(Handle { id, handle: self.add(SftpHandle::File { fh, write })? })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(SftpHandle::File { fh, write }) => {
                self.run(move |fs| {
                    // Always released, even when the commit failed, so the file is not held.
                    let flushed = if write { fs.flush(fh, 0) } else { Ok(()) };
                    let released = fs.release(fh);
                    // An SFTP client takes a successful close as "uploaded": it returns once
                    // the file is committed, not only queued.
                    let committed = if write { fs.settle() } else { Ok(()) };
                    flushed.and(released).and(committed)
                })
                .await?
            }
            Some(SftpHandle::Dir { fh, .. }) => self.fs.releasedir(fh),
            None => return Err(StatusCode::Failure.with_message("no such handle")),
        }
        Ok(ok(id))
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Result<Data, Self::Error> {
        let fh = self.file_handle(&handle)?;
        let len = len.min(READ_BYTES_MAX) as usize;
        let data = self.run(move |fs| fs.read(fh, offset, len)).await?;
        if data.is_empty() && len > 0 {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Result<Status, Self::Error> {
        let fh = self.file_handle(&handle)?;
        self.run(move |fs| fs.write(fh, offset, &data).map(|_| ())).await?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let p = resolve(&path)?;
        let a = self.run(move |fs| fs.stat(&p)).await?;
        Ok(Attrs { id, attrs: attributes(&a) })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let (_, a) = self.follow(resolve(&path)?).await?;
        Ok(Attrs { id, attrs: attributes(&a) })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let fh = self.file_handle(&handle)?;
        let a = self.run(move |fs| fs.getattr(fs.handle_ino(fh)?, Some(fh))).await?;
        Ok(Attrs { id, attrs: attributes(&a) })
    }

    async fn setstat(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        // truncate(2), chmod(2) and utimes(2) follow a symlink, as OpenSSH's server does
        // (inside the bucket): a link is never made a file holding its target's name.
        let (p, _) = self.follow(resolve(&path)?).await?;
        let (mode, mtime_ms, size) = changes_of(&attrs);
        self.run(move |fs| fs.setattr(&p, mode, mtime_ms, size).map(|_| ())).await?;
        Ok(ok(id))
    }

    async fn fsetstat(&mut self, id: u32, handle: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        let fh = self.file_handle(&handle)?;
        let (mode, mtime_ms, size) = changes_of(&attrs);
        self.run(move |fs| fs.setattr_ino(fs.handle_ino(fh)?, mode, mtime_ms, size).map(|_| ())).await?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let (p, _) = self.follow(resolve(&path)?).await?;
        let fh = self.run(move |fs| fs.opendir(&p)).await?;
        Ok(Handle { id, handle: self.add(SftpHandle::Dir { fh, pos: 0 })? })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(SftpHandle::Dir { fh, pos }) = self.handles.get_mut(&handle) else {
            return Err(StatusCode::Failure.with_message("no such directory handle"));
        };
        let entries = self.fs.dir_entries(*fh).map_err(status)?;
        if *pos >= entries.len() {
            return Err(StatusCode::Eof.into());
        }
        let end = (*pos + READDIR_BATCH).min(entries.len());
        let files = entries[*pos..end].iter().map(|(name, a)| File::new(name.clone(), attributes(a))).collect();
        *pos = end;
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let p = resolve(&filename)?;
        self.run(move |fs| fs.remove(&p, false)).await?;
        Ok(ok(id))
    }

    async fn mkdir(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        let p = resolve(&path)?;
        let mode = attrs.permissions.map(|m| m & 0o7777).unwrap_or(0o755);
        self.run(move |fs| fs.mkdir(&p, mode).map(|_| ())).await?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let p = resolve(&path)?;
        self.run(move |fs| fs.remove(&p, true)).await?;
        Ok(ok(id))
    }

    async fn rename(&mut self, id: u32, oldpath: String, newpath: String) -> Result<Status, Self::Error> {
        // SFTP v3's rename does not replace (as OpenSSH's server); posix-rename does.
        let (from, to) = (resolve(&oldpath)?, resolve(&newpath)?);
        self.run(move |fs| fs.rename(&from, &to, true)).await?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = resolve(&path)?;
        let target = self.run(move |fs| fs.readlink(&p)).await?;
        Ok(Name { id, files: vec![File::dummy(target)] })
    }

    async fn symlink(&mut self, id: u32, linkpath: String, targetpath: String) -> Result<Status, Self::Error> {
        // OpenSSH sends the target first and the link second (the reverse of the draft);
        // every common client follows OpenSSH.
        let (target, link) = (linkpath, resolve(&targetpath)?);
        self.run(move |fs| fs.symlink(&link, &target).map(|_| ())).await?;
        Ok(ok(id))
    }

    async fn extended(&mut self, id: u32, request: String, data: Vec<u8>) -> Result<Packet, Self::Error> {
        match request.as_str() {
            "posix-rename@openssh.com" => {
                let (old, rest) = ssh_string(&data)?;
                let (new, _) = ssh_string(rest)?;
                let (from, to) = (resolve(&old)?, resolve(&new)?);
                self.run(move |fs| fs.rename(&from, &to, false)).await?;
                Ok(Packet::Status(ok(id)))
            }
            "fsync@openssh.com" => {
                let (handle, _) = ssh_string(&data)?;
                let fh = self.file_handle(&handle)?;
                self.run(move |fs| fs.fsync(fh)).await?;
                Ok(Packet::Status(ok(id)))
            }
            _ => Err(StatusCode::OpUnsupported.into()),
        }
    }
}

/// One SSH string (u32 length, bytes) from the front of `data`, and the rest.
fn ssh_string(data: &[u8]) -> Result<(String, &[u8]), StatusReply> {
    let bad = || StatusCode::BadMessage.with_message("malformed extended request");
    let len = u32::from_be_bytes(data.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let body = data.get(4..4 + len).ok_or_else(bad)?;
    let s = String::from_utf8(body.to_vec()).map_err(|_| bad())?;
    Ok((s, &data[4 + len..]))
}

#[cfg(test)]
mod fuzz {
    //! SFTP packets from a hostile or broken client, through russh-sftp's decoder into this
    //! server's handler over an in-memory stream: valid requests of every kind (paths that
    //! climb out with `..`, handles never issued, writes far past the end) with bytes
    //! flipped, and noise. The session must end when the client does, without a panic, and
    //! the store must still answer. `PROPTEST_CASES` sets the count.

    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One SFTP packet: its length, type, request id and fields (strings length-prefixed).
    fn packet(ty: u8, id: u32, fields: &[Field]) -> Vec<u8> {
        let mut body = vec![ty];
        body.extend_from_slice(&id.to_be_bytes());
        for f in fields {
            match f {
                Field::Str(s) => {
                    body.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    body.extend_from_slice(s);
                }
                Field::U32(v) => body.extend_from_slice(&v.to_be_bytes()),
                Field::U64(v) => body.extend_from_slice(&v.to_be_bytes()),
            }
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    enum Field {
        Str(Vec<u8>),
        U32(u32),
        U64(u64),
    }

    /// Valid requests of every kind the server handles, on paths good and bad.
    fn requests(path: &[u8], handle: &[u8], data: &[u8]) -> Vec<Vec<u8>> {
        use Field::*;
        let (p, h) = (|| Str(path.to_vec()), || Str(handle.to_vec()));
        vec![
            packet(3, 1, &[p(), U32(0x1a), U32(0)]),                 // open write|creat|trunc
            packet(3, 2, &[p(), U32(0x01), U32(0)]),                 // open read
            packet(6, 3, &[h(), U64(1 << 40), Str(data.to_vec())]), // write far out
            packet(6, 4, &[h(), U64(0), Str(data.to_vec())]),
            packet(5, 5, &[h(), U64(0), U32(u32::MAX)]), // read
            packet(4, 6, &[h()]),                        // close
            packet(7, 7, &[p()]),                        // lstat
            packet(17, 8, &[p()]),                       // stat
            packet(11, 9, &[p()]),                       // opendir
            packet(12, 10, &[h()]),                      // readdir
            packet(13, 11, &[p()]),                      // remove
            packet(14, 12, &[p(), U32(0)]),              // mkdir
            packet(15, 13, &[p()]),                      // rmdir
            packet(16, 14, &[p()]),                      // realpath
            packet(18, 15, &[p(), Str(b"/renamed".to_vec())]),
            packet(9, 16, &[p(), U32(0x4), U32(0o7777)]), // setstat permissions
            packet(20, 17, &[p(), Str(b"../../../etc/passwd".to_vec())]), // symlink
            packet(19, 18, &[p()]),                      // readlink
        ]
    }

    proptest! {
        #[test]
        fn any_packets_end_the_session_cleanly_and_the_store_still_answers(
            picks in proptest::collection::vec((0usize..18, 0usize..6, 0usize..3), 1..12),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            noise in prop_oneof![Just(Vec::new()), proptest::collection::vec(any::<u8>(), 1..64)],
        ) {
            let (rt, fs) = &*SERVER;
            let paths: [&[u8]; 6] = [b"/a.txt", b"/../../etc/passwd", b"", b"/d/../../x", b"//", b"/\xff\xfe"];
            let handles: [&[u8]; 3] = [b"1", b"999999", b"\x00"];
            let mut wire = packet(1, 3, &[]); // INIT: its "id" is the version, 3
            for (kind, path, handle) in &picks {
                wire.extend(requests(paths[*path], handles[*handle], b"bytes")[*kind].clone());
            }
            if !wire.is_empty() {
                // Flip bytes after INIT (the version exchange is russh-sftp's alone).
                for (at, mask) in &flips {
                    let i = 9 + at % (wire.len() - 9).max(1);
                    if i < wire.len() {
                        wire[i] ^= (*mask).max(1);
                    }
                }
            }
            let clean = flips.is_empty() && noise.is_empty();
            wire.extend(noise);
            let fs = fs.clone();
            let ended = rt.block_on(async move {
                let (mut client, server) = tokio::io::duplex(1 << 16);
                let session = tokio::spawn(russh_sftp::server::run(server, SftpSession { fs, handles: HashMap::new(), next: 1 }));
                let (mut rx, mut tx) = tokio::io::split(&mut client);
                let mut replies = Vec::new();
                let reading = async { let _ = rx.read_to_end(&mut replies).await; };
                let writing = async { let _ = tx.write_all(&wire).await; let _ = tx.shutdown().await; };
                let _ = tokio::time::timeout(Duration::from_secs(10), futures_join(reading, writing)).await;
                drop(client);
                (tokio::time::timeout(Duration::from_secs(10), session).await, replies)
            });
            let (ended, replies) = ended;
            if clean {
                // Unharmed requests are answered: the version, then a reply per request.
                prop_assert_eq!(replies.get(4), Some(&2u8), "no VERSION reply: {:?}", replies);
                let mut n = 0;
                let mut at = 0;
                while at + 4 <= replies.len() {
                    at += 4 + u32::from_be_bytes(replies[at..at + 4].try_into().unwrap()) as usize;
                    n += 1;
                }
                prop_assert_eq!(n, picks.len() + 1, "a reply per request");
            }
            let joined = ended.expect("the session ended when the client did");
            prop_assert!(joined.is_ok(), "the session panicked: {:?}", joined.err());
            prop_assert!(SERVER.1.opendir(&TreePath::root()).is_ok(), "the store still answers");
        }
    }

    async fn futures_join(a: impl std::future::Future<Output = ()>, b: impl std::future::Future<Output = ()>) {
        tokio::join!(a, b);
    }

    /// One store and one runtime for every case (opening a store per case would be most of
    /// the time). Read-only: a writable mount needs a running node; the write requests are
    /// decoded and refused (EROFS) all the same.
    static SERVER: std::sync::LazyLock<(tokio::runtime::Runtime, Arc<MountFs>)> = std::sync::LazyLock::new(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        alknet_actors::engine::Engine::init(&dir).unwrap();
        let fs = Arc::new(MountFs::open(&dir, Scope::new("default", "main"), true).unwrap());
        (tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(), fs)
    });
}
