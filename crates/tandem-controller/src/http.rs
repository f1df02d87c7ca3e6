//! What the node API and the cluster API share: error responses as
//! `{message, cause, correction}`, and running blocking work off the async threads.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_api::ApiError;

/// An error response: its status and the error the caller sees.
pub struct Failure(pub StatusCode, pub ApiError);

impl Failure {
    pub fn new(
        status: StatusCode,
        message: impl Into<String>,
        correction: impl Into<String>,
    ) -> Self {
        Failure(
            status,
            ApiError {
                message: message.into(),
                cause: None,
                correction: Some(correction.into()),
            },
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        tracing::debug!(message = %self.1.message, status = %self.0, "API request refused");
        (self.0, Json(self.1)).into_response()
    }
}

impl From<JsonRejection> for Failure {
    fn from(r: JsonRejection) -> Self {
        let mut f = Failure::new(
            StatusCode::BAD_REQUEST,
            "request body is not valid",
            "send a JSON object with the documented fields (see /openapi.json on the controller)",
        );
        f.1.cause = Some(r.body_text());
        f
    }
}

impl From<PathRejection> for Failure {
    fn from(r: PathRejection) -> Self {
        let mut f = Failure::new(
            StatusCode::BAD_REQUEST,
            "a name in the URL is not valid",
            "names use letters, digits, '_', '.', '-'",
        );
        f.1.cause = Some(r.body_text());
        f
    }
}

/// Runs `f` (database writes, disk syncs, calls to other nodes) on the blocking pool.
pub async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, Failure>
where
    T: Send + 'static,
    E: Into<Failure> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Into::into),
        Err(e) => {
            let mut f = Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request handler failed",
                "see the tandemd log",
            );
            f.1.cause = Some(e.to_string());
            Err(f)
        }
    }
}
