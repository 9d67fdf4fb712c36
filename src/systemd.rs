//! Every systemd interaction in one place: readiness, status, stopping and
//! watchdog notifications over `$NOTIFY_SOCKET` (no-ops without it).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// Storage is recovered and every listener is bound: `READY=1`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A human-readable status line (`STATUS=`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown has begun: `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// When the unit sets `WatchdogSec=`, pings `WATCHDOG=1` at half the
/// interval until `stop` is cancelled.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
