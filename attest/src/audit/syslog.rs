//! Entries as RFC 5424 syslog messages, octet-counted for TCP (RFC 6587 §3.4.1), so the fleet's
//! SIEM collects them. The message is the entry's exact log line, so a collector can recompute its
//! leaf hash and check it against an exported checkpoint. This module writes to any `Write`; the
//! caller opens the connection.

use std::io::{self, Write};

use super::log::{Entry, Outcome};

/// Facility 13, "log audit" (RFC 5424 §6.2.1).
const FACILITY_LOG_AUDIT: u8 = 13;

/// One RFC 5424 message: `<PRI>1 TIME HOST sanctum - MSGID - LINE`, where MSGID is the event and
/// the severity is informational for a success, warning for a refusal, error for a failure.
pub fn message(entry: &Entry, line: &[u8], hostname: &str) -> Vec<u8> {
    let severity = match entry.outcome {
        Outcome::Ok => 6,
        Outcome::Refused => 4,
        Outcome::Error => 3,
    };
    let pri = FACILITY_LOG_AUDIT * 8 + severity;
    let mut out = format!(
        "<{pri}>1 {} {} sanctum - {} - ",
        entry.time,
        header_field(hostname, 255),
        header_field(&entry.event, 32)
    )
    .into_bytes();
    out.extend_from_slice(line);
    out
}

/// A header field as RFC 5424 allows it: printable ASCII without spaces, bounded, `-` if empty.
fn header_field(value: &str, max: usize) -> String {
    let field: String = value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if field.is_empty() { "-".into() } else { field }
}

/// Writes `message` with octet-counting framing: its length, a space, the message.
pub fn send(out: &mut impl Write, message: &[u8]) -> io::Result<()> {
    write!(out, "{} ", message.len())?;
    out.write_all(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_a_framed_rfc5424_warning_carrying_the_line() {
        let line = br#"{"index":3}"#;
        let entry = Entry {
            index: 3,
            time: "2026-12-02T10:00:00.000Z".into(),
            user: "alice".into(),
            event: "pull".into(),
            command: "sanctum models pull".into(),
            model: None,
            model_digest: None,
            output_digest: None,
            bundle_digest: None,
            outcome: Outcome::Refused,
            detail: None,
            prev: String::new(),
        };
        let msg = message(&entry, line, "dev box");
        assert_eq!(
            msg,
            b"<108>1 2026-12-02T10:00:00.000Z devbox sanctum - pull - {\"index\":3}"
        );
        let mut framed = Vec::new();
        send(&mut framed, &msg).unwrap();
        assert!(framed.starts_with(format!("{} <108>", msg.len()).as_bytes()));
    }
}
