//! Coordination between hosts: the leader lease ([`leader`]), app locks
//! ([`locks`]) and their metrics. The scheduler that uses the lease lives in
//! `crate::sched`.

pub mod leader;
pub mod locks;
pub mod metrics;
