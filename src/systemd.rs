//! systemd notifications (`Type=notify`): ready, stopping, watchdog. All are
//! no-ops when not running under systemd.

use std::time::Duration;

use sd_notify::NotifyState;

pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

pub fn notify_watchdog() {
    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
}

/// The watchdog interval systemd expects pings within, if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}
