//! The route table: every route of SPEC §6 and §9, each to its resource's
//! handler, all behind the one trust middleware. Unknown routes answer 404
//! `not_found`, known routes with another method 405 `method_not_allowed`,
//! both behind the middleware too (401 without credentials), and no body
//! over [`MAX_BODY_BYTES`] is read.
//!
//! Who may call each route is not decided here but in
//! [`crate::trust::routes::ROUTES`]; the middleware is applied to every
//! route of [`routes`] at once, so a route added there cannot skip it.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use axum::Router;
use graft::Node;

use crate::errors::{method_not_allowed, not_found};
use crate::live::{dashboard, metrics, stream, tree, Live};
use crate::trust::{self, Trust};
use crate::{
    eval, events, health, modules, openapi, processes, reload, sandboxes, tokens, MAX_BODY_BYTES,
};

/// The router's state: the node and its trust. Handlers take what they need
/// (`State<Node>`, `State<Arc<Trust>>`) through [`FromRef`].
#[derive(Clone)]
pub struct AppState {
    /// The node.
    pub node: Node,
    /// Its tokens, sessions, rules and audit log.
    pub trust: Arc<Trust>,
}

impl FromRef<AppState> for Node {
    fn from_ref(s: &AppState) -> Node {
        s.node.clone()
    }
}

impl FromRef<AppState> for Arc<Trust> {
    fn from_ref(s: &AppState) -> Arc<Trust> {
        s.trust.clone()
    }
}

/// Every route, without the middleware.
fn routes() -> Router<AppState> {
    Router::new()
        // SPEC §10: seeing it live.
        .route("/", get(dashboard::index))
        .route("/assets/app.css", get(dashboard::css))
        .route("/assets/app.js", get(dashboard::js))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/events", get(stream::page))
        .route("/api/v1/events/stream", get(stream::stream))
        .route("/api/v1/sandboxes/{id}/tree", get(tree::tree))
        .route("/api/v1/health", get(health::health))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route(
            "/api/v1/sandboxes",
            get(sandboxes::list).post(sandboxes::create),
        )
        .route(
            "/api/v1/sandboxes/{id}",
            get(sandboxes::info).delete(sandboxes::destroy),
        )
        .route("/api/v1/sandboxes/{id}/restart", post(sandboxes::restart))
        .route("/api/v1/sandboxes/{id}/processes", get(processes::list))
        .route(
            "/api/v1/sandboxes/{id}/processes/{target}/state",
            get(processes::state),
        )
        .route("/api/v1/sandboxes/{id}/call", post(processes::call))
        .route("/api/v1/sandboxes/{id}/cast", post(processes::cast))
        .route("/api/v1/sandboxes/{id}/send", post(processes::send))
        .route("/api/v1/sandboxes/{id}/spawn", post(processes::spawn))
        .route("/api/v1/sandboxes/{id}/modules", get(modules::list))
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/versions",
            get(modules::versions),
        )
        .route(
            "/api/v1/sandboxes/{id}/modules/{module}/rollback",
            post(modules::rollback),
        )
        .route("/api/v1/sandboxes/{id}/reload", post(reload::reload))
        .route("/api/v1/sandboxes/{id}/eval", post(eval::eval))
        .route("/api/v1/sandboxes/{id}/events", get(events::events))
        .route("/api/v1/reload", post(reload::batch))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route(
            "/api/v1/tokens/{token}",
            axum::routing::delete(tokens::revoke),
        )
        .route("/api/v1/audit", get(trust::audit::list))
        .route(
            "/api/v1/session",
            get(trust::session::show)
                .post(trust::session::create)
                .delete(trust::session::delete),
        )
}

/// The answers of an unknown path (404) and of a known path with another
/// method (405).
fn with_fallbacks(routes: Router<AppState>) -> Router<AppState> {
    routes
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
}

fn finish(routes: Router<AppState>, state: AppState, live: Live) -> Router {
    routes
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            live.metrics().clone(),
            metrics::track,
        ))
        .layer(axum::Extension(live))
        .with_state(state)
}

/// The API router for `node`, every route behind `trust`'s middleware:
/// SPEC §6 under `/api/v1`, the event stream, `/metrics` and the dashboard
/// at `/` (SPEC §10).
///
/// Serve it with [`axum::Router::into_make_service_with_connect_info`]
/// (`SocketAddr`) so that failed authentication is limited per peer.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use std::sync::Arc;
/// let node = graft::Node::builder().data_dir("/var/lib/graft").open()?;
/// let store = node.store().expect("a node opened on a data directory").clone();
/// graft_http::trust::ensure_admin_token_file("/var/lib/graft".as_ref(), &store)?;
/// let trust = Arc::new(graft_http::trust::Trust::new(store, Default::default())?);
/// let app = graft_http::router(node, trust);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await?;
/// axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
/// # Ok(()) }
/// ```
pub fn router(node: Node, trust: Arc<Trust>) -> Router {
    let live = Live::new(node.clone());
    router_with(node, trust, live)
}

/// [`router`] with the live parts given, so that another listener (a
/// separate metrics port) can share them.
pub fn router_with(node: Node, trust: Arc<Trust>, live: Live) -> Router {
    let state = AppState { node, trust };
    // `layer`, not `route_layer`: the fallbacks go through the middleware
    // too, so an unknown path is 401 before it is 404.
    let protected = with_fallbacks(routes()).layer(axum::middleware::from_fn_with_state(
        state.clone(),
        trust::middleware::enforce,
    ));
    finish(protected, state, live)
}

/// Only `GET /metrics`, for a listener of its own (`--metrics-bind`), behind
/// the same middleware (a viewer token).
pub fn metrics_router(trust: Arc<Trust>, live: Live) -> Router {
    let state = AppState {
        node: live.node().clone(),
        trust,
    };
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            trust::middleware::enforce,
        ))
        .layer(axum::Extension(live))
        .with_state(state)
}

/// The same API with no authentication, no browser rules and no audit: the
/// baseline of the benchmark that measures what trust costs. Never serve it.
#[cfg(feature = "bench-baseline")]
pub fn router_without_auth(node: Node, trust: Arc<Trust>) -> Router {
    use axum::extract::Request;
    use axum::middleware::Next;
    // The handlers that read the caller or the peer still find them. The
    // same shape as `router`'s middleware (state, on every route and the
    // fallbacks), so that the two differ only in what the middleware does.
    async fn as_admin(
        axum::extract::State(_): axum::extract::State<AppState>,
        mut req: Request,
        next: Next,
    ) -> axum::response::Response {
        req.extensions_mut().insert(trust::Caller {
            token_id: "baseline".into(),
            role: trust::Role::Admin,
            sandboxes: None,
            session_expires_ms: None,
        });
        req.extensions_mut().insert(trust::Peer(None));
        next.run(req).await
    }
    let live = Live::new(node.clone());
    let state = AppState { node, trust };
    let open = with_fallbacks(routes()).layer(axum::middleware::from_fn_with_state(
        state.clone(),
        as_admin,
    ));
    finish(open, state, live)
}
