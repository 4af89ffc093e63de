//! The client side of the control socket: blocking. A `Client` keeps its connection for the
//! requests that follow (the node serves them in order on one connection); the CLI makes one.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use super::{read_frame, write_frame, Reply, Request, SOCKET_FILE, STREAM_CHUNK_BYTES};

/// A connection to a running node.
pub struct Client {
    socket: PathBuf,
    stream: std::sync::Mutex<Option<UnixStream>>,
    /// How long one request's send and its answer may each take (`None`: as long as the
    /// node needs; the CLI waits for a merge of millions of paths).
    timeout: Option<std::time::Duration>,
}

impl Client {
    /// A client for the node of `dir`, if one answers on its socket. A socket file that
    /// refuses connections is a leftover of a node that died: treated as no node.
    pub fn connect(dir: &Path) -> Option<Client> {
        let socket = dir.join(SOCKET_FILE);
        let stream = UnixStream::connect(&socket).ok()?;
        Some(Client { socket, stream: std::sync::Mutex::new(Some(stream)), timeout: None })
    }

    /// [`connect`](Self::connect), each request failing when its send or its answer takes
    /// longer than `timeout` (a mount: a node that is stopped or stuck must not hang the
    /// programs using it). A request that timed out may still be applied by the node.
    pub fn connect_with_timeout(dir: &Path, timeout: std::time::Duration) -> Option<Client> {
        let mut c = Self::connect(dir)?;
        c.timeout = Some(timeout);
        if let Some(s) = c.stream.get_mut().expect("client stream").as_ref() {
            s.set_read_timeout(c.timeout).ok()?;
            s.set_write_timeout(c.timeout).ok()?;
        }
        Some(c)
    }

    /// The open connection, or a new one. A connection that failed is not reused: after an
    /// error the reply stream may be out of step.
    fn take(&self) -> Result<UnixStream> {
        if let Some(s) = self.stream.lock().expect("client stream").take() {
            if still_open(&s) {
                return Ok(s);
            }
        }
        let stream = UnixStream::connect(&self.socket).with_context(|| format!("connecting to the node at {} (is it still running?)", self.socket.display()))?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
        Ok(stream)
    }

    fn give_back(&self, stream: UnixStream) {
        *self.stream.lock().expect("client stream") = Some(stream);
    }

    /// Sends `req` and returns the node's reply; a reply of `Error` becomes an `Err`.
    pub fn call(&self, req: &Request) -> Result<Reply> {
        let mut stream = self.take()?;
        write_frame(&mut stream, &serde_json::to_vec(req)?)?;
        let reply = read_reply(&mut stream)?;
        self.give_back(stream);
        reply.into_result()
    }

    /// Sends `req` followed by everything `data` yields, in frames, then an empty frame.
    pub fn call_streaming(&self, req: &Request, mut data: impl Read) -> Result<Reply> {
        let mut stream = self.take()?;
        write_frame(&mut stream, &serde_json::to_vec(req)?)?;
        let mut buf = vec![0u8; STREAM_CHUNK_BYTES];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading input"),
            };
            if let Err(e) = write_frame(&mut stream, &buf[..n]) {
                return Err(answer_after_failed_send(&mut stream, e));
            }
        }
        if let Err(e) = write_frame(&mut stream, &[]) {
            return Err(answer_after_failed_send(&mut stream, e));
        }
        let reply = read_reply(&mut stream)?;
        self.give_back(stream);
        reply.into_result()
    }
}

/// The node stops reading a streamed put that failed (disk full, a bad path) and answers at
/// once, closing the connection: our next write then fails. Its answer is waiting in the
/// socket: that is the error to show, not "broken pipe".
fn answer_after_failed_send(stream: &mut UnixStream, send_error: io::Error) -> anyhow::Error {
    match read_reply(stream) {
        Ok(Reply::Error { message }) => anyhow!("{message}"),
        _ => anyhow!(send_error).context("sending data to the node"),
    }
}

fn read_reply(stream: &mut UnixStream) -> Result<Reply> {
    let payload = match read_frame(stream) {
        Ok(p) => p,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(anyhow!("the node did not answer in time (is it stopped or overloaded?); the request may still be applied"))
        }
        Err(e) => return Err(e).context("the node closed the connection without answering"),
    };
    serde_json::from_slice(&payload).map_err(|e| anyhow!("unreadable reply from the node: {e}"))
}

/// The node answered with an error (as opposed to not answering at all: a connection that
/// failed, a node that is down).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Reply {
    /// `Error` as an `Err` ([`Refused`]).
    fn into_result(self) -> Result<Reply> {
        match self {
            Reply::Error { message } => Err(Refused(message).into()),
            reply => Ok(reply),
        }
    }
}

/// Whether a kept connection is still open: the node closes connections idle for long (a
/// mount between writes), and a request written to a closed one is lost. A readable end of
/// stream (or anything unread) means it is not usable.
fn still_open(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut probe = [0u8; 1];
    // SAFETY: a valid socket and a one-byte buffer; MSG_PEEK leaves any byte unread.
    let n = unsafe { libc::recv(stream.as_raw_fd(), probe.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}
