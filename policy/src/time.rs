//! The trusted clock: max(system clock, a persisted floor).
//!
//! Devices have bad clocks, and an attacker with the device can set the clock back to revive
//! an expired token. The floor is the latest time learnt from something verified (a token's
//! `iat`, a signed document, the broker), kept in `<data>/trusted-time` as decimal Unix
//! seconds, replaced atomically (temp file, fsync, rename). The floor only moves forward.

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
}
