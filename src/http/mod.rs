//! The localhost HTTP API: routes, request metrics, JSON errors for
//! everything (including unknown routes, wrong methods, malformed paths and
//! panics), and serving on TCP and/or a unix socket.

pub mod cache;
pub mod coord;
pub mod error;
pub mod events;
pub mod node;
pub mod search;
pub mod uploads;
pub mod write;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::app::App;
pub use error::ApiError;

/// Builds the router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/cache", get(cache::list_caches))
        .route("/v1/cache/{cache}", get(cache::list).delete(cache::clear))
        .route(
            "/v1/cache/{cache}/{*key}",
            get(cache::get_entry)
                .put(cache::put_entry)
                .delete(cache::delete_entry),
        )
        .route("/v1/batch", post(cache::batch))
        .route("/v1/wait", get(node::wait))
        .route("/v1/status", get(node::status))
        .route("/v1/cluster", get(node::cluster))
        .route("/v1/resync", post(node::resync))
        .route("/v1/role", get(coord::role))
        .route("/v1/jobs", get(coord::jobs))
        .route("/v1/jobs/{name}/runs", get(coord::runs))
        .route("/v1/jobs/{name}/run", post(coord::run_now))
        .route(
            "/v1/locks/{name}",
            post(coord::acquire).delete(coord::release),
        )
        .route("/v1/locks/{name}/renew", post(coord::renew))
        .route("/v1/versions", get(coord::versions))
        .route("/v1/versions/{name}", get(coord::version))
        .route("/v1/versions/{name}/bump", post(coord::bump))
        .route("/v1/search", get(search::indexes))
        .route("/v1/search/{index}", get(search::search))
        .route("/v1/search/{index}/rebuild", post(search::rebuild))
        .route("/v1/uploads", get(uploads::list).post(uploads::create))
        .route(
            "/v1/uploads/{id}",
            get(uploads::get)
                .head(uploads::head)
                .delete(uploads::delete),
        )
        .route("/v1/uploads/{id}/path", get(uploads::path))
        .route("/v1/events", get(events::events))
        .route("/healthz", get(node::healthz))
        .route("/readyz", get(node::readyz))
        .route("/metrics", get(node::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::new(Observer::new(&app.metrics)),
            observe,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API lives under /v1/ (see docs/api.md)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal("internal error (logged on the server)").into_response()
}

/// The routes, as matched (the label values of the request metrics).
const ROUTES: &[&str] = &[
    "/v1/cache",
    "/v1/cache/{cache}",
    "/v1/cache/{cache}/{*key}",
    "/v1/batch",
    "/v1/wait",
    "/v1/status",
    "/v1/cluster",
    "/v1/resync",
    "/v1/role",
    "/v1/jobs",
    "/v1/jobs/{name}/runs",
    "/v1/jobs/{name}/run",
    "/v1/locks/{name}",
    "/v1/locks/{name}/renew",
    "/v1/versions",
    "/v1/versions/{name}",
    "/v1/versions/{name}/bump",
    "/v1/search",
    "/v1/search/{index}",
    "/v1/search/{index}/rebuild",
    "/v1/uploads",
    "/v1/uploads/{id}",
    "/v1/uploads/{id}/path",
    "/v1/events",
    "/healthz",
    "/readyz",
    "/metrics",
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One route's metric handles, resolved once (label lookups cost more than
/// the rest of a cached read).
struct RouteMetrics {
    by_class: [prometheus::IntCounter; 5],
    duration: prometheus::Histogram,
}

impl RouteMetrics {
    fn new(metrics: &crate::metrics::Metrics, route: &str) -> Self {
        Self {
            by_class: CLASSES.map(|c| metrics.http_requests.with_label_values(&[route, c])),
            duration: metrics.http_duration.with_label_values(&[route]),
        }
    }
}

struct Observer {
    routes: std::collections::HashMap<&'static str, RouteMetrics>,
    unmatched: RouteMetrics,
}

impl Observer {
    fn new(metrics: &crate::metrics::Metrics) -> Self {
        Self {
            routes: ROUTES
                .iter()
                .map(|r| (*r, RouteMetrics::new(metrics, r)))
                .collect(),
            unmatched: RouteMetrics::new(metrics, "unmatched"),
        }
    }
}

/// Counts requests by route and status class, and times them.
async fn observe(State(observer): State<Arc<Observer>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| observer.routes.get(p.as_str()))
        .unwrap_or(&observer.unmatched);
    let response = next.run(request).await;
    let class = usize::from((response.status().as_u16() / 100).clamp(1, 5)) - 1;
    route.by_class[class].inc();
    route.duration.observe(started.elapsed().as_secs_f64());
    response
}

/// Where the API listens.
#[derive(Default)]
pub struct Listeners {
    pub tcp: Option<tokio::net::TcpListener>,
    pub unix: Option<tokio::net::UnixListener>,
}

/// Serves the API on every listener until `stop` is cancelled, then drains
/// open requests.
///
/// TCP connections are served by one thread per core, each with its own
/// single-threaded runtime accepting from the same socket, the way nginx's
/// workers do: a connection stays on the thread that accepted it, so a
/// request costs no hand-off between threads (on the 2-core development VM,
/// 8 µs of CPU per cached `GET` instead of 11 on the shared work-stealing
/// runtime). Handlers run there too; anything slow in them is sent to the
/// blocking pool, as it must be anyway. The unix socket, used by fewer
/// clients, stays on the main runtime.
pub async fn serve(
    app: Arc<App>,
    listeners: Listeners,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let router = router(app);
    let mut servers = tokio::task::JoinSet::new();
    // Ends the TCP threads at once if this future is dropped (the drain
    // timed out and the task was aborted).
    let hard_stop = CancellationToken::new();
    let _hard_stop_on_drop = hard_stop.clone().drop_guard();
    if let Some(tcp) = listeners.tcp {
        let addr = tcp.local_addr()?;
        let threads =
            std::thread::available_parallelism().map_or(2, |n| n.get().min(MAX_HTTP_THREADS));
        tracing::info!(%addr, threads, "api listening");
        let tcp = tcp.into_std()?;
        for i in 0..threads {
            let listener = tcp.try_clone()?;
            let (router, stop, hard_stop) = (router.clone(), stop.clone(), hard_stop.clone());
            let (done, finished) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("tandem-http-{i}"))
                .spawn(move || {
                    let _ = done.send(serve_tcp_thread(listener, router, stop, hard_stop));
                })?;
            servers.spawn(async move {
                finished
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("an HTTP thread panicked")))
            });
        }
    }
    if let Some(unix) = listeners.unix {
        let path = unix
            .local_addr()?
            .as_pathname()
            .map(|p| p.display().to_string());
        tracing::info!(path = ?path, "api listening on unix socket");
        let s = stop.clone();
        servers.spawn(async move {
            axum::serve(unix, router)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
        });
    }
    while let Some(result) = servers.join_next().await {
        result.map_err(std::io::Error::other)??;
    }
    Ok(())
}

/// At most this many threads serve TCP connections.
const MAX_HTTP_THREADS: usize = 16;

/// One TCP-serving thread: its own runtime, accepting from its copy of the
/// listening socket until `stop` (then draining) or `hard_stop`.
fn serve_tcp_thread(
    listener: std::net::TcpListener,
    router: Router,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let serving = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
        tokio::select! {
            r = serving => r,
            _ = hard_stop.cancelled() => Ok(()),
        }
    })
}
