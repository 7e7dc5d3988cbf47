//! The node's HTTP admin endpoint and its client.
//!
//! The endpoint carries [`Control`] over HTTP/JSON so `torusctl` can drive an
//! embedded node whose metadata (sled) only that node can open. Errors travel
//! as `{"kind": "...", "message": "..."}` with a matching status code, and the
//! client turns them back into the same [`Error`] kind.
//!
//! Routes: `GET /healthz`, `GET /v1/cluster`, `POST /v1/init`,
//! `GET|POST /v1/volumes`, `DELETE /v1/volumes/{name}`, `GET /v1/peers`,
//! `GET /v1/ring`, `POST /v1/ring/{add,remove,replication}`.

use crate::catalog::VolumeRecord;
use crate::cluster::{ClusterRecord, InitParams};
use crate::control::{Balance, Control, VolumeStatus};
use crate::node::Node;
use crate::peers::PeerStatus;
use crate::scrub::ScrubResult;
use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use torus_traits::{Error, Result, Ring, Shutdown};

#[derive(Clone)]
struct AdminState {
    control: Arc<dyn Control>,
    node: Option<Node>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    kind: String,
    message: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PeerNames {
    peers: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Replication {
    replication: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct CreateVolume {
    name: String,
    size: u64,
}

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::Locked(_) => StatusCode::CONFLICT,
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Unavailable(_) | Error::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            kind: self.0.kind_name().into(),
            message: message_of(&self.0),
        };
        (status, Json(body)).into_response()
    }
}

/// The message without the kind prefix `Display` adds, so the client can
/// rebuild the same error without repeating it.
fn message_of(e: &Error) -> String {
    e.message()
        .map(str::to_owned)
        .unwrap_or_else(|| e.to_string())
}

/// Kinds that carry more than a message (lease ids, I/O context) arrive as
/// `Other`, with their full text.
fn error_from(kind: &str, m: String) -> Error {
    Error::from_kind_name(kind, m.clone()).unwrap_or(Error::Other(m))
}

type ApiResult<T> = std::result::Result<Json<T>, ApiError>;

async fn cluster_h(State(s): State<AdminState>) -> ApiResult<ClusterRecord> {
    s.control.cluster().await.map(Json).map_err(ApiError)
}

async fn init_h(
    State(s): State<AdminState>,
    Json(p): Json<InitParams>,
) -> ApiResult<ClusterRecord> {
    s.control.init(p).await.map(Json).map_err(ApiError)
}

async fn list_volumes_h(State(s): State<AdminState>) -> ApiResult<Vec<VolumeStatus>> {
    s.control.list_volumes().await.map(Json).map_err(ApiError)
}

async fn create_volume_h(
    State(s): State<AdminState>,
    Json(c): Json<CreateVolume>,
) -> ApiResult<VolumeRecord> {
    s.control
        .create_volume(&c.name, c.size)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn request_scrub_h(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult<u64> {
    s.control
        .request_scrub(&name)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn scrub_result_h(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<Option<ScrubResult>> {
    s.control
        .scrub_result(&name)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn delete_volume_h(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<VolumeRecord> {
    s.control
        .delete_volume(&name)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn list_peers_h(State(s): State<AdminState>) -> ApiResult<Vec<PeerStatus>> {
    if let Some(node) = &s.node {
        // Report this node's current usage, not the last heartbeat's.
        if let Err(e) = node.heartbeat().await {
            tracing::debug!("heartbeat before list-peers: {e}");
        }
    }
    s.control.list_peers().await.map(Json).map_err(ApiError)
}

async fn balance_h(State(s): State<AdminState>) -> ApiResult<Balance> {
    s.control.balance().await.map(Json).map_err(ApiError)
}

async fn ring_h(State(s): State<AdminState>) -> ApiResult<Ring> {
    s.control.ring().await.map(Json).map_err(ApiError)
}

async fn ring_add_h(State(s): State<AdminState>, Json(p): Json<PeerNames>) -> ApiResult<Ring> {
    s.control
        .add_peers(&p.peers)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn ring_remove_h(State(s): State<AdminState>, Json(p): Json<PeerNames>) -> ApiResult<Ring> {
    s.control
        .remove_peers(&p.peers)
        .await
        .map(Json)
        .map_err(ApiError)
}

async fn ring_replication_h(
    State(s): State<AdminState>,
    Json(r): Json<Replication>,
) -> ApiResult<Ring> {
    s.control
        .set_replication(r.replication)
        .await
        .map(Json)
        .map_err(ApiError)
}

/// The admin router over `control` (and the local node, for fresh figures).
pub fn router(control: Arc<dyn Control>, node: Option<Node>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/cluster", get(cluster_h))
        .route("/v1/init", post(init_h))
        .route("/v1/volumes", get(list_volumes_h).post(create_volume_h))
        .route("/v1/volumes/{name}", delete(delete_volume_h))
        .route(
            "/v1/volumes/{name}/scrub",
            get(scrub_result_h).post(request_scrub_h),
        )
        .route("/v1/peers", get(list_peers_h))
        .route("/v1/balance", get(balance_h))
        .route("/v1/ring", get(ring_h))
        .route("/v1/ring/add", post(ring_add_h))
        .route("/v1/ring/remove", post(ring_remove_h))
        .route("/v1/ring/replication", post(ring_replication_h))
        .with_state(AdminState { control, node })
}

/// Serve the admin endpoint on an already-bound listener until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut shutdown: Shutdown,
) -> Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(|e| Error::io("admin endpoint", e))
}

/// [`Control`] over a node's admin endpoint.
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `server` is a URL such as `http://127.0.0.1:4321` (a bare host:port works too).
    pub fn new(server: &str) -> Result<Self> {
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        Ok(AdminClient { base, http })
    }

    async fn call<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                Error::Unavailable(format!(
                    "cannot reach the torus node at {} (is torusd running? use --server to point elsewhere)",
                    self.base
                ))
            } else if e.is_timeout() {
                Error::Timeout(format!("the torus node at {} did not answer in time", self.base))
            } else {
                Error::Unavailable(format!("request to {} failed: {e}", self.base))
            }
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| {
            Error::Unavailable(format!("reading the reply from {}: {e}", self.base))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| Error::Other(format!("bad reply from {}: {e}", self.base)));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(error_from(&b.kind, b.message)),
            Err(_) => Err(Error::Other(format!(
                "{} answered {status}: {}",
                self.base,
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

#[async_trait]
impl Control for AdminClient {
    async fn init(&self, params: InitParams) -> Result<ClusterRecord> {
        self.call(self.http.post(self.url("/v1/init")).json(&params))
            .await
    }
    async fn cluster(&self) -> Result<ClusterRecord> {
        self.call(self.http.get(self.url("/v1/cluster"))).await
    }
    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeRecord> {
        let body = CreateVolume {
            name: name.to_string(),
            size,
        };
        self.call(self.http.post(self.url("/v1/volumes")).json(&body))
            .await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>> {
        self.call(self.http.get(self.url("/v1/volumes"))).await
    }
    async fn delete_volume(&self, name: &str) -> Result<VolumeRecord> {
        // Volume names are validated to URL-safe characters; encode anyway.
        let path = format!("/v1/volumes/{}", urlencode(name));
        self.call(self.http.delete(self.url(&path))).await
    }
    async fn list_peers(&self) -> Result<Vec<PeerStatus>> {
        self.call(self.http.get(self.url("/v1/peers"))).await
    }
    async fn request_scrub(&self, name: &str) -> Result<u64> {
        let path = format!("/v1/volumes/{}/scrub", urlencode(name));
        self.call(self.http.post(self.url(&path))).await
    }
    async fn scrub_result(&self, name: &str) -> Result<Option<ScrubResult>> {
        let path = format!("/v1/volumes/{}/scrub", urlencode(name));
        self.call(self.http.get(self.url(&path))).await
    }
    async fn balance(&self) -> Result<Balance> {
        self.call(self.http.get(self.url("/v1/balance"))).await
    }
    async fn ring(&self) -> Result<Ring> {
        self.call(self.http.get(self.url("/v1/ring"))).await
    }
    async fn add_peers(&self, peers: &[String]) -> Result<Ring> {
        let body = PeerNames {
            peers: peers.to_vec(),
        };
        self.call(self.http.post(self.url("/v1/ring/add")).json(&body))
            .await
    }
    async fn remove_peers(&self, peers: &[String]) -> Result<Ring> {
        let body = PeerNames {
            peers: peers.to_vec(),
        };
        self.call(self.http.post(self.url("/v1/ring/remove")).json(&body))
            .await
    }
    async fn set_replication(&self, replication: u32) -> Result<Ring> {
        let body = Replication { replication };
        self.call(self.http.post(self.url("/v1/ring/replication")).json(&body))
            .await
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
