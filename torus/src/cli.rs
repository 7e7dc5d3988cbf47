//! Output formatting shared by the binaries: the original Torus tables.

use crate::control::{Balance, VolumeStatus};
use crate::peers::{Membership, PeerStatus};
use torus_traits::ByteSize;

/// Left-aligned columns separated by two spaces (like Go's tabwriter as the
/// original used it). The last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// "4 seconds ago", as go-humanize prints it.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    let (n, unit) = match s {
        0 => return "now".into(),
        1..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        _ => (s / 86_400, "day"),
    };
    if n == 1 {
        format!("1 {unit} ago")
    } else {
        format!("{n} {unit}s ago")
    }
}

/// `torusctl volume list`.
pub fn volume_table(volumes: &[VolumeStatus]) -> String {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.record.name.clone(),
                ByteSize(v.record.size).to_string(),
                "block".into(),
                v.status.clone(),
            ]
        })
        .collect();
    table(&["VOLUME NAME", "SIZE", "TYPE", "STATUS"], &rows)
}

/// `torusctl volume scrub`: what the scrub found and fixed; an error when
/// it could not finish or left blocks unrecoverable.
pub fn scrub_text(name: &str, r: &crate::scrub::ScrubResult) -> Result<String, String> {
    let s = &r.report;
    let text = format!(
        "scrubbed volume {name}: {} chunks, {} blocks compared, {} mismatched, {} repaired, {} unrecoverable\n",
        s.chunks, s.blocks, s.mismatches, s.repaired, s.unrecoverable
    );
    match &r.error {
        Some(e) => Err(format!("{text}scrub stopped early: {e}")),
        None if s.unrecoverable > 0 => Err(text),
        None => Ok(text),
    }
}

/// `torusctl list-peers`: the table, then `Balanced: … Usage: …%`.
/// Balanced means every member is up and `balance` has no chunk left to
/// move, resync or clean up.
pub fn peer_table(peers: &[PeerStatus], now_ms: u64, balance: &Balance) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let member = match p.member {
                Membership::Ok => "OK",
                Membership::Avail => "Avail",
                Membership::Down => "DOWN",
            };
            vec![
                p.info.address.clone(),
                p.info.id.to_string(),
                ByteSize(p.info.capacity).to_string(),
                ByteSize(p.info.used).to_string(),
                member.into(),
                ago(now_ms, p.info.updated_unix_ms),
                format!("{}/sec", ByteSize(p.info.rebalance_rate)),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ADDRESS",
            "UUID",
            "SIZE",
            "USED",
            "MEMBER",
            "UPDATED",
            "REB/REP DATA",
        ],
        &rows,
    );
    let members: Vec<&PeerStatus> = peers
        .iter()
        .filter(|p| p.member != Membership::Avail)
        .collect();
    // The copy rate is not consulted: `balance` knows what is left to do,
    // and the rate lags it by a heartbeat.
    let balanced = balance.balanced() && members.iter().all(|p| p.member == Membership::Ok);
    let (used, cap) = members
        .iter()
        .filter(|p| p.member == Membership::Ok)
        .fold((0u64, 0u64), |(u, c), p| {
            (u + p.info.used, c + p.info.capacity)
        });
    let usage = if cap == 0 {
        0.0
    } else {
        used as f64 * 100.0 / cap as f64
    };
    out.push_str(&format!("Balanced: {balanced} Usage: {usage:5.2}%\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn ago_reads_like_humanize() {
        assert_eq!(ago(10_000, 6_000), "4 seconds ago");
        assert_eq!(ago(10_000, 9_500), "now");
        assert_eq!(ago(200_000, 80_000), "2 minutes ago");
        assert_eq!(ago(1, 0), "never");
    }
}
