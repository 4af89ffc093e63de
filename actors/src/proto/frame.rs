//! Length-prefixed frames, as used on the local control socket: a 4-byte big-endian length,
//! then that many bytes. Checking is separate from reading, so a reader can refuse an
//! oversized frame from its header alone, before buffering anything.

/// Most bytes one control frame may carry (a request, a reply, or a chunk of streamed data).
pub const CONTROL_FRAME_BYTES_MAX: usize = 8 << 20;
/// Bytes of the length header.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announced more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The payload length a frame header announces, checked against `max`.
pub fn check_header(header: [u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Appends one frame carrying `payload` to `out`. Panics if the payload exceeds
/// [`CONTROL_FRAME_BYTES_MAX`]: callers chunk their data (a programmer error otherwise).
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= CONTROL_FRAME_BYTES_MAX, "frame payload of {} bytes: chunk it", payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut out = Vec::new();
        encode(b"hello", &mut out);
        assert_eq!(check_header(out[..4].try_into().unwrap(), 16), Ok(5));
        assert_eq!(&out[4..], b"hello");
        assert_eq!(check_header(u32::MAX.to_be_bytes(), CONTROL_FRAME_BYTES_MAX), Err(FrameError::TooLarge { len: u32::MAX as usize, max: CONTROL_FRAME_BYTES_MAX }));
        encode(b"", &mut out);
        assert_eq!(check_header(out[9..13].try_into().unwrap(), 0), Ok(0));
    }
}
