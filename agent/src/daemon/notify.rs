//! The systemd notification protocol (sd_notify): one datagram per state change to the
//! socket named by `NOTIFY_SOCKET`. Without that variable every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|raw| {
            use std::os::unix::ffi::OsStringExt;
            let raw = raw.into_vec();
            let target = if let Some(name) = raw.strip_prefix(b"@") {
                Target::Abstract(name.to_vec())
            } else if raw.starts_with(b"/") {
                Target::Path(std::ffi::OsString::from_vec(raw).into())
            } else {
                return None;
            };
            UnixDatagram::unbound().ok().map(|s| (s, target))
        });
        Self { socket }
    }

    /// Sends `state` (e.g. `READY=1`); failures are reported, never fatal.
    pub fn notify(&self, state: &str) {
        let Some((socket, target)) = &self.socket else {
            return;
        };
        let sent = match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            tracing::warn!(state, error = %e, "Cannot notify systemd.");
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when the watchdog is meant for
/// this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The watchdog task: `WATCHDOG=1` every `every` until shutdown.
#[derive(Debug)]
pub struct Watchdog {
    pub every: Duration,
}

impl Watchdog {
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let notifier = Notifier::from_env();
        let mut tick = tokio::time::interval(self.every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => notifier.notify("WATCHDOG=1"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_arrive_as_datagrams_on_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), Target::Path(path))),
        };
        n.notify("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        // Without a socket nothing happens, and nothing fails.
        Notifier { socket: None }.notify("READY=1");
    }
}
