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

/// The watchdog interval systemd expects pings within, if enabled:
/// `WATCHDOG_USEC`, for this process unless `WATCHDOG_PID` names another
/// (libsystemd's rule; an unset `WATCHDOG_PID` applies to the process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
