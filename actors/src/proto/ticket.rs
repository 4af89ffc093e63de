//! Invitations: a ticket carries what a new node needs to join one bucket — where the inviter
//! listens, who it is, which bucket, and a one-time secret the inviter checks (it keeps only
//! the secret's hash, with an expiry and a number of uses).
//!
//! Printed as `alkfs1` and lowercase base32 of a versioned binary form, so it survives a
//! terminal, a chat message or a QR code, and a typo is caught as "malformed", not mistaken
//! for a different ticket.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ids::{NodeId, Uid};

/// What every ticket starts with.
pub const TICKET_PREFIX: &str = "alkfs1";

/// Bytes of an invitation secret.
pub const SECRET_BYTES: usize = 16;

/// The longest ticket text accepted (a ticket names a handful of addresses).
pub const TICKET_CHARS_MAX: usize = 2048;

/// Most addresses a ticket carries.
pub const TICKET_ADDRS_MAX: usize = 16;

/// An invitation to join a bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The inviter's node id (its iroh endpoint id).
    pub node: NodeId,
    /// Where the inviter listens.
    pub addrs: Vec<SocketAddr>,
    /// The inviter's relay, if it uses one.
    pub relay: Option<String>,
    /// The bucket it shares.
    pub bucket: Uid,
    /// The one-time secret the inviter checks.
    pub secret: [u8; SECRET_BYTES],
}

/// Why text is not a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Wrong prefix, bad characters, truncated, or a checksum mismatch.
    #[error("this is not an alkfs ticket ({0}): copy the whole line `alkfs invite` printed")]
    Malformed(&'static str),
}

#[derive(Serialize, Deserialize)]
struct Wire {
    format: u8,
    ticket: Ticket,
}

const FORMAT: u8 = 1;
const CHECK_BYTES: usize = 4;

fn checksum(bytes: &[u8]) -> [u8; CHECK_BYTES] {
    // FNV-1a 32: catches typos and truncation (the secret is what proves anything).
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_be_bytes()
}

impl Ticket {
    /// The ticket as text.
    pub fn encode(&self) -> String {
        let mut bytes = postcard::to_allocvec(&Wire { format: FORMAT, ticket: self.clone() }).expect("encoding to memory cannot fail");
        let check = checksum(&bytes);
        bytes.extend_from_slice(&check);
        format!("{TICKET_PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
    }

    /// Parses a ticket; surrounding whitespace is ignored.
    pub fn decode(text: &str) -> Result<Self, TicketError> {
        let text = text.trim();
        if text.len() > TICKET_CHARS_MAX {
            return Err(TicketError::Malformed("too long"));
        }
        let body = text.strip_prefix(TICKET_PREFIX).ok_or(TicketError::Malformed("it does not start with alkfs1"))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketError::Malformed("bad characters or length"))?;
        if bytes.len() <= CHECK_BYTES {
            return Err(TicketError::Malformed("truncated"));
        }
        let (payload, check) = bytes.split_at(bytes.len() - CHECK_BYTES);
        if checksum(payload) != check {
            return Err(TicketError::Malformed("checksum mismatch: a character was changed or lost"));
        }
        let wire: Wire = postcard::from_bytes(payload).map_err(|_| TicketError::Malformed("undecodable"))?;
        if wire.format != FORMAT {
            return Err(TicketError::Malformed("made by a newer alkfs"));
        }
        if wire.ticket.addrs.len() > TICKET_ADDRS_MAX || wire.ticket.relay.as_ref().is_some_and(|r| r.len() > 512) {
            return Err(TicketError::Malformed("too many addresses"));
        }
        Ok(wire.ticket)
    }
}

/// When an invitation may be used, checked by the inviter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InviteTerms {
    /// Unusable from this time on (ms since the epoch).
    pub expires_ms: i64,
    /// Joins left.
    pub uses_left: u32,
}

/// Why an inviter refuses a join; the words reach the joining user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No invitation with that secret (forged, or for another node or bucket).
    #[error("the ticket was refused: its secret is not one this node issued (ask for a new ticket with `alkfs invite`)")]
    UnknownSecret,
    /// Past its expiry.
    #[error("the ticket has expired: ask for a new one (`alkfs invite --expires 24h`)")]
    Expired,
    /// Every use taken.
    #[error("the ticket has been used up: ask for a new one (`alkfs invite --uses N`)")]
    UsedUp,
    /// The joiner was removed from the bucket; a ticket does not undo that silently.
    #[error("this node was removed from the bucket, and a ticket does not bring a removed member back")]
    Removed,
    /// The inviter is no longer an owner of the bucket (it was removed since it invited).
    #[error("the node that made the ticket may no longer admit members: ask an owner of the bucket for a new ticket")]
    NotAnOwner,
}

/// The inviter's decision on a join with a known secret at `now_ms`.
pub fn admit(terms: Option<InviteTerms>, now_ms: i64) -> Result<InviteTerms, JoinRefusal> {
    let terms = terms.ok_or(JoinRefusal::UnknownSecret)?;
    if now_ms >= terms.expires_ms {
        return Err(JoinRefusal::Expired);
    }
    if terms.uses_left == 0 {
        return Err(JoinRefusal::UsedUp);
    }
    Ok(InviteTerms { uses_left: terms.uses_left - 1, ..terms })
}

/// Parses a duration as users write it: `90s`, `30m`, `24h`, `7d`. Returns milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a duration: write e.g. 30m, 24h or 7d");
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).filter(|v| *v > 0 && *v <= 366 * 86_400_000).ok_or_else(|| format!("{s}: give a duration between 1s and 366d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            node: NodeId([4; 32]),
            addrs: vec!["127.0.0.1:4100".parse().unwrap(), "[::1]:4100".parse().unwrap()],
            relay: None,
            bucket: Uid([8; 16]),
            secret: [0x5a; SECRET_BYTES],
        }
    }

    #[test]
    fn a_ticket_survives_text_and_any_changed_character_is_caught() {
        let t = ticket();
        let text = t.encode();
        assert!(text.starts_with("alkfs1") && text.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{text}");
        assert_eq!(Ticket::decode(&format!("  {text}\n")).unwrap(), t);
        for i in TICKET_PREFIX.len()..text.len() {
            let mut forged = text.clone().into_bytes();
            forged[i] = if forged[i] == b'x' { b'y' } else { b'x' };
            let forged = String::from_utf8(forged).unwrap();
            assert!(Ticket::decode(&forged).is_err(), "changed char {i} not caught");
        }
        for cut in 0..text.len() {
            assert!(Ticket::decode(&text[..cut]).is_err(), "truncated at {cut}");
        }
        assert!(Ticket::decode("alkfs1").is_err());
        assert!(Ticket::decode(&"a".repeat(TICKET_CHARS_MAX + 1)).is_err());
    }

    #[test]
    fn the_inviter_admits_only_a_live_unused_invitation() {
        let terms = InviteTerms { expires_ms: 1_000, uses_left: 1 };
        assert_eq!(admit(None, 0), Err(JoinRefusal::UnknownSecret));
        assert_eq!(admit(Some(terms), 1_000), Err(JoinRefusal::Expired));
        let after = admit(Some(terms), 999).unwrap();
        assert_eq!(after.uses_left, 0);
        assert_eq!(admit(Some(after), 999), Err(JoinRefusal::UsedUp));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        for bad in ["", "h", "24", "24x", "-1h", "0s", "400d", "99999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
