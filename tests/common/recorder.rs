//! A real local HTTP endpoint that records every call tandem's jobs make
//! (with the `Tandem-*` headers) and answers as the path asks:
//! `/ok` 200, `/fail` 500, `/slow` after 30 s, `/flaky/N` 500 for the first
//! N calls then 200, `/hold/MS` 200 after MS milliseconds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub job: String,
    pub host: String,
    pub token: i64,
    pub scheduled_for: String,
    pub attempt: u32,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    flaky: std::collections::HashMap<String, u32>,
}

/// The endpoint.
#[derive(Clone)]
pub struct Recorder {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn header(req: &Request, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> StatusCode {
    let path = req.uri().path().to_string();
    let call = Call {
        job: header(&req, "tandem-job"),
        host: header(&req, "tandem-host"),
        token: header(&req, "tandem-fencing-token").parse().unwrap_or(-1),
        scheduled_for: header(&req, "tandem-scheduled-for"),
        attempt: header(&req, "tandem-attempt").parse().unwrap_or(0),
        path: path.clone(),
        at: Instant::now(),
    };
    let key = format!("{}@{}", call.job, call.scheduled_for);
    inner.lock().unwrap().calls.push(call);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["ok", ..] => StatusCode::OK,
        ["fail", ..] => StatusCode::INTERNAL_SERVER_ERROR,
        ["slow", ..] => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK
        }
        ["hold", ms, ..] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            StatusCode::OK
        }
        ["flaky", n, ..] => {
            let n: u32 = n.parse().unwrap_or(1);
            let mut i = inner.lock().unwrap();
            let seen = i.flaky.entry(key).or_default();
            *seen += 1;
            if *seen > n {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
        _ => StatusCode::NOT_FOUND,
    }
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Recorder { addr, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The hosts that called for each scheduled time of one job.
    pub fn hosts_per_time(&self, job: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut per_time = std::collections::BTreeMap::<String, Vec<String>>::new();
        for c in self.calls_of(job) {
            per_time.entry(c.scheduled_for).or_default().push(c.host);
        }
        per_time
    }

    /// Calls of one job.
    pub fn calls_of(&self, job: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.job == job).collect()
    }
}
