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
        let mut f = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is too large",
                "the API's bodies are small JSON objects (at most 2 MiB); nothing was read past the limit",
            )
        } else {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "request body is not valid",
                "send a JSON object with the documented fields (see /openapi.json on the controller)",
            )
        };
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

/// Equality whose time depends only on the length of `expected`, not on where the
/// first difference is.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization: Bearer TOKEN` header value.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether an `Authorization` header carries `secret` as its bearer token.
pub fn authorized(header: Option<&str>, secret: &str) -> bool {
    header
        .and_then(bearer)
        .is_some_and(|given| same_secret(given, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abcdef", "abcdef"));
        for other in ["abcdeg", "abcde", "abcdefg", ""] {
            assert!(!same_secret(other, "abcdef"), "{other}");
        }
    }

    #[test]
    fn bearer_header_is_parsed_case_insensitively() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(authorized(Some("bearer  s3cret"), "s3cret"));
        assert!(!authorized(Some("Basic s3cret"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
