//! The trusted clock: max(system clock, a persisted floor).
//!
//! Devices have bad clocks, and an attacker with the device can set the clock back to revive
//! an expired token. The floor is the latest time learnt from something verified (a token's
//! `iat`, a signed document, the broker), kept in `<data>/trusted-time` as decimal Unix
//! seconds, replaced atomically (temp file, fsync, rename). The floor only moves forward.
//!
//! Also here: times and ages as people write them on a command line ([`parse_duration`],
//! [`parse_time`]), shared by the device's and the hub's commands so both read `--since 2h`
//! the same way.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Unix seconds now, by the system clock.
pub fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[derive(Debug)]
pub struct TrustedClock {
    floor: i64,
    path: Option<PathBuf>,
    /// Tests pin the system clock here.
    system: Option<i64>,
}

impl TrustedClock {
    /// The clock whose floor lives in `path` (absent or unreadable: no floor yet).
    pub fn open(path: &Path) -> Self {
        let floor = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Self {
            floor,
            path: Some(path.to_path_buf()),
            system: None,
        }
    }

    /// A clock that persists nothing, with the system clock pinned at `system`.
    pub fn fixed(system: i64, floor: i64) -> Self {
        Self {
            floor,
            path: None,
            system: Some(system),
        }
    }

    pub fn floor(&self) -> i64 {
        self.floor
    }

    pub fn now(&self) -> i64 {
        self.system.unwrap_or_else(system_now).max(self.floor)
    }

    /// Raises the floor to `t` if it is later; persisting is best effort (a failure leaves
    /// the old floor on disk, which is still a valid lower bound).
    pub fn observe(&mut self, t: i64) {
        if t <= self.floor {
            return;
        }
        self.floor = t;
        if let Some(path) = &self.path {
            let _ = persist(path, t);
        }
    }
}

fn persist(path: &Path, t: i64) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    writeln!(tmp, "{t}")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A time or duration a person wrote that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimeInputError(String);

/// Seconds in `90s`, `30m`, `2h`, `7d` (a bare number is seconds), at most 100 years.
pub fn parse_duration(s: &str) -> Result<u64, TimeInputError> {
    let s = s.trim();
    let bad = || TimeInputError(format!("'{s}' is not a duration like 90s, 30m, 2h or 7d"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .filter(|&v| v <= 100 * 365 * 86_400)
        .ok_or_else(|| TimeInputError(format!("'{s}' is too long")))
}

/// RFC 3339 (any offset) or an age before now (`30m`, `2h`, `7d`), as the audit log's own
/// timestamp format (what its `ts` filters compare against).
pub fn parse_time(s: &str) -> Result<String, TimeInputError> {
    if let Ok(t) =
        ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
    {
        return Ok(crate::audit::format_ts(t));
    }
    let secs = parse_duration(s).map_err(|_| {
        TimeInputError(format!(
            "'{s}' is neither an RFC 3339 time nor an age like 30m, 2h or 7d"
        ))
    })?;
    // At most 100 years (parse_duration's cap), so this fits an i64.
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let t = ::time::OffsetDateTime::now_utc() - ::time::Duration::seconds(secs);
    Ok(crate::audit::format_ts(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_only_moves_forward_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trusted-time");
        let mut c = TrustedClock::open(&p);
        assert_eq!(c.floor(), 0);
        let future = system_now() + 10_000;
        c.observe(future);
        c.observe(5);
        assert_eq!(c.now(), future, "a clock behind the floor reads the floor");
        assert_eq!(TrustedClock::open(&p).floor(), future);
        assert_eq!(TrustedClock::fixed(100, 50).now(), 100);
    }

    fn check_duration(input: &str, expect: Option<u64>) {
        assert_eq!(parse_duration(input).ok(), expect, "{input}");
    }

    #[test]
    fn durations() {
        check_duration("90", Some(90));
        check_duration("90s", Some(90));
        check_duration("30m", Some(1800));
        check_duration("2h", Some(7200));
        check_duration("7d", Some(604_800));
        check_duration("7w", None);
        check_duration("", None);
        check_duration("-5m", None);
        check_duration("99999999999d", None);
    }

    #[test]
    fn times_are_rfc3339_or_ages() {
        let t = parse_time("2026-01-02T03:04:05+01:00").unwrap();
        assert!(t.starts_with("2026-01-02T02:04:05"), "{t}");
        let age = parse_time("1h").unwrap();
        let now = crate::audit::now_rfc3339();
        assert!(age < now, "{age} vs {now}");
        assert!(parse_time("yesterday").is_err());
    }
}
