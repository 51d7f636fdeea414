//! The leader lease as this host sees it.
//!
//! The lease lives in PostgreSQL and is judged by the database's clock: the
//! heartbeat statement also acquires or renews it (see `cluster::beat`).
//! Locally, a term is trusted only until `sent + lease * 0.9` on the
//! monotonic clock, where `sent` is when the last successful renewal was
//! *sent*: the database set the expiry at least `lease` after that moment,
//! so this host stops acting as leader before the database can consider the
//! lease expired — even if the process was frozen in between.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use super::metrics::CoordMetrics;

/// What one lease statement answered.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The current holder (None when free or expired).
    pub holder: Option<String>,
    /// The fencing token of the current (or last) term.
    pub token: i64,
    /// Seconds until the lease expires, by the database's clock.
    pub expires_in: f64,
    /// The database's clock (Unix seconds) when it answered.
    pub db_now: f64,
    pub live_hosts: i64,
}

#[derive(Debug, Default)]
struct State {
    leader: Option<String>,
    token: i64,
    /// This host's term: its token and the local deadline.
    mine: Option<(i64, Instant)>,
    live_hosts: i64,
    /// Database clock minus local clock, in milliseconds.
    offset_ms: i64,
    /// When the current holder's lease ends, on the local clock.
    holder_until: Option<Instant>,
    observed: bool,
    /// This host resigned (shutting down): no answer arriving later, a
    /// renewal sent before the release included, starts a term again.
    resigned: bool,
}

/// `GET /v1/role`.
#[derive(Debug, Clone, Serialize)]
pub struct RoleView {
    pub host: String,
    /// `single` (the only live host), `leader` or `follower`.
    pub role: &'static str,
    pub leader: Option<String>,
    pub fencing_token: i64,
    pub eligible: bool,
    pub lease_seconds: f64,
    /// Seconds this host's own term still runs (null when not leader).
    pub term_remaining_seconds: Option<f64>,
}

/// This host's view of the lease.
pub struct Leadership {
    host: String,
    eligible: bool,
    lease: Duration,
    state: Mutex<State>,
    /// The token of this host's current term, 0 when it has none.
    term_tx: watch::Sender<i64>,
}

impl Leadership {
    pub fn new(host: &str, eligible: bool, lease: Duration) -> Self {
        Self {
            host: host.to_string(),
            eligible,
            lease,
            state: Mutex::new(State::default()),
            term_tx: watch::channel(0).0,
        }
    }

    pub fn eligible(&self) -> bool {
        self.eligible
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The token of this host's term, if it leads right now.
    pub fn term(&self) -> Option<i64> {
        let s = self.state.lock().expect("not poisoned");
        s.mine
            .filter(|(_, deadline)| Instant::now() < *deadline)
            .map(|(t, _)| t)
    }

    /// Whether a lease statement has answered yet (so [`Self::now_db`]
    /// follows the database's clock).
    pub fn observed(&self) -> bool {
        self.state.lock().expect("not poisoned").observed
    }

    /// Wakes when this host's term starts or ends.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.term_tx.subscribe()
    }

    /// Records the answer to a lease statement sent at `sent`.
    pub fn observe(
        &self,
        sent: Instant,
        sent_wall: SystemTime,
        obs: &Observation,
        m: &CoordMetrics,
    ) {
        let received = Instant::now();
        let mut s = self.state.lock().expect("not poisoned");
        let half_rtt = received.duration_since(sent) / 2;
        let local_ms = (sent_wall + half_rtt)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        s.offset_ms = (obs.db_now * 1000.0) as i64 - local_ms;
        s.live_hosts = obs.live_hosts;
        s.observed = true;
        if s.leader != obs.holder {
            if s.leader.is_some() || obs.holder.is_some() {
                m.leader_changes.inc();
            }
            tracing::info!(leader = ?obs.holder, token = obs.token, "leader changed");
            s.leader = obs.holder.clone();
        }
        s.token = obs.token;
        m.fencing_token.set(obs.token);
        s.holder_until = obs
            .holder
            .as_ref()
            .map(|_| received + Duration::from_secs_f64(obs.expires_in));
        let had = s.mine.map(|(t, _)| t);
        if obs.holder.as_deref() == Some(self.host.as_str()) && !s.resigned {
            // At most 0.9 of a lease from when the statement was sent, and
            // never past what the database says is left of it (a statement
            // that did not renew answers the time left, which may be short).
            let left = Duration::from_secs_f64(obs.expires_in.max(0.0));
            let margin = self.lease.mul_f64(0.1);
            let deadline = sent + self.lease.mul_f64(0.9).min(left.saturating_sub(margin));
            s.mine = Some((obs.token, deadline));
            if had != Some(obs.token) {
                tracing::info!(token = obs.token, "this host is now the leader");
                m.is_leader.set(1);
                self.term_tx.send_replace(obs.token);
            }
        } else if had.is_some() {
            s.mine = None;
            tracing::warn!(leader = ?obs.holder, "this host is no longer the leader");
            m.is_leader.set(0);
            self.term_tx.send_replace(0);
        }
    }

    /// Ends this host's term locally once its deadline has passed (renewals
    /// failed). True if it stepped down now.
    pub fn check_deadline(&self, m: &CoordMetrics) -> bool {
        let mut s = self.state.lock().expect("not poisoned");
        match s.mine {
            Some((token, deadline)) if Instant::now() >= deadline => {
                s.mine = None;
                s.leader = None;
                m.is_leader.set(0);
                m.leader_changes.inc();
                tracing::warn!(
                    token,
                    "stepping down: the leader lease could not be renewed in time"
                );
                self.term_tx.send_replace(0);
                true
            }
            _ => false,
        }
    }

    /// Ends this host's term (clean shutdown); the token to release.
    pub fn resign(&self, m: &CoordMetrics) -> Option<i64> {
        let mut s = self.state.lock().expect("not poisoned");
        s.resigned = true;
        let (token, deadline) = s.mine.take()?;
        m.is_leader.set(0);
        self.term_tx.send_replace(0);
        (Instant::now() < deadline).then_some(token)
    }

    /// How long until the next heartbeat/lease statement should be sent.
    pub fn next_beat(&self, heartbeat: Duration) -> Duration {
        let s = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        if let Some((_, deadline)) = s.mine {
            let renew = self.lease / 3;
            return renew.min(deadline.saturating_duration_since(now));
        }
        if !self.eligible || !s.observed {
            return heartbeat;
        }
        match s.holder_until {
            // Try again just after the holder's lease would run out.
            Some(until) => {
                heartbeat.min(until.saturating_duration_since(now) + Duration::from_millis(20))
            }
            None => heartbeat.min(self.lease / 3),
        }
    }

    /// The database's clock, estimated from the last answer.
    pub fn now_db(&self) -> DateTime<Utc> {
        let offset = self.state.lock().expect("not poisoned").offset_ms;
        Utc::now() + chrono::Duration::milliseconds(offset)
    }

    pub fn view(&self) -> RoleView {
        let term = self.term();
        let s = self.state.lock().expect("not poisoned");
        let role = if s.live_hosts <= 1 {
            "single"
        } else if term.is_some() {
            "leader"
        } else {
            "follower"
        };
        RoleView {
            host: self.host.clone(),
            role,
            leader: s.leader.clone(),
            fencing_token: s.token,
            eligible: self.eligible,
            lease_seconds: self.lease.as_secs_f64(),
            term_remaining_seconds: term
                .and(s.mine)
                .map(|(_, d)| d.saturating_duration_since(Instant::now()).as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(holder: Option<&str>, token: i64) -> Observation {
        Observation {
            holder: holder.map(str::to_string),
            token,
            expires_in: 10.0,
            db_now: 1_700_000_000.0,
            live_hosts: 2,
        }
    }

    #[test]
    fn terms_start_end_and_expire_locally() {
        let m = CoordMetrics::new(&prometheus::Registry::new());
        let l = Leadership::new("a", true, Duration::from_secs(2));
        let mut rx = l.subscribe();
        l.observe(Instant::now(), SystemTime::now(), &obs(Some("b"), 3), &m);
        assert_eq!(l.term(), None);
        assert_eq!(l.view().role, "follower");
        l.observe(Instant::now(), SystemTime::now(), &obs(Some("a"), 4), &m);
        assert_eq!(l.term(), Some(4));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 4);
        assert_eq!(l.view().role, "leader");
        // A renewal sent long ago: the local deadline has already passed.
        let old = Instant::now() - Duration::from_secs(3);
        l.observe(old, SystemTime::now(), &obs(Some("a"), 4), &m);
        assert_eq!(l.term(), None);
        assert!(l.check_deadline(&m));
        assert_eq!(*rx.borrow_and_update(), 0);
        // An answer that did not renew: the term lasts only as long as the
        // database says is left (less a tenth of a lease), not 0.9 of one.
        let mut short = obs(Some("a"), 4);
        short.expires_in = 0.1;
        l.observe(Instant::now(), SystemTime::now(), &short, &m);
        assert_eq!(l.term(), None, "0.1 s left is within the margin");
        short.expires_in = 1.5;
        l.observe(Instant::now(), SystemTime::now(), &short, &m);
        assert_eq!(l.term(), Some(4));
        // Resigned: a renewal answered afterwards does not bring it back.
        assert_eq!(l.resign(&m), Some(4));
        l.observe(Instant::now(), SystemTime::now(), &obs(Some("a"), 4), &m);
        assert_eq!(l.term(), None);
        assert_eq!(l.view().role, "follower");
        // The database clock is estimated from the answer.
        let skew = (l.now_db().timestamp() - 1_700_000_000).abs();
        assert!(skew < 5, "{skew}");
    }
}
