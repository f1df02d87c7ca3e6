//! HTTP calls to the controller (or a node) API, with errors a person can act on.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_api::ApiError;

/// The largest JSON answer read (a listing of thousands of volumes fits).
const ANSWER_LIMIT: u64 = 64 << 20;

pub struct Client {
    /// The APIs to try, in order (`--controller URL,URL`); any node of the cluster
    /// answers the cluster API.
    bases: Vec<String>,
    /// The one that answered last, tried first.
    current: AtomicUsize,
    agent: ureq::Agent,
    /// The cluster API's access token (`TANDEM_TOKEN`), when it requires one.
    token: Option<String>,
}

/// Environment variable holding the cluster API's access token (kept out of the command
/// line, where other users could read it).
pub const TOKEN_VAR: &str = "TANDEM_TOKEN";

pub enum CliError {
    /// The API answered with an error (HTTP status, body).
    Api { status: u16, error: ApiError },
    /// The API could not be reached.
    Transport { url: String, why: String },
    /// The API answered something this CLI does not understand.
    Answer { url: String, why: String },
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Api { error, .. } => write!(f, "{error}"),
            CliError::Transport { url, why } => write!(
                f,
                "cannot talk to tandemd at {url}: {why}\n  hint: is tandemd running there? \
                 Point the CLI at any node of the cluster with --controller URL[,URL...] or \
                 TANDEM_CONTROLLER"
            ),
            CliError::Answer { url, why } => write!(
                f,
                "tandemd at {url} gave an unexpected answer: {why}\n  hint: are the CLI and \
                 tandemd the same version? `tandem cluster` shows the controller's"
            ),
        }
    }
}

impl Client {
    /// A client of the API at `base`, or of the first of a comma-separated list that
    /// answers.
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            bases: base
                .split(',')
                .map(|b| b.trim().trim_end_matches('/').to_owned())
                .filter(|b| !b.is_empty())
                .collect(),
            current: AtomicUsize::new(0),
            agent,
            token: std::env::var(TOKEN_VAR).ok().filter(|t| !t.is_empty()),
        }
    }

    /// The same API with another access token (`None`: none).
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    /// The API that answered last (the first, before any call).
    pub fn base(&self) -> &str {
        self.bases
            .get(self.current.load(Relaxed))
            .map_or("", String::as_str)
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, CliError> {
        let bytes = self.exchange(method, path, body, ANSWER_LIMIT)?;
        String::from_utf8(bytes).map_err(|e| CliError::Answer {
            url: self.base().to_owned(),
            why: e.to_string(),
        })
    }

    /// A binary answer of up to `limit` bytes (a database backup).
    pub fn get_bytes(&self, path: &str, limit: u64) -> Result<Vec<u8>, CliError> {
        self.exchange("GET", path, None, limit)
    }

    /// Tries each API in turn, from the one that answered last, while they cannot be
    /// reached or answer that they have no controller (503: the node asked may not
    /// know yet where a new controller runs, another may); the first other answer
    /// counts, error or not.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        limit: u64,
    ) -> Result<Vec<u8>, CliError> {
        let n = self.bases.len().max(1);
        let first = self.current.load(Relaxed);
        let mut unreachable = Vec::new();
        let mut no_controller = None;
        for k in 0..n {
            let i = (first + k) % n;
            let Some(base) = self.bases.get(i) else { break };
            match self.exchange_with(base, method, path, body.clone(), limit) {
                Err(CliError::Transport { url, why }) => unreachable.push(format!("{url}: {why}")),
                Err(e @ CliError::Api { status: 503, .. }) if k + 1 < n => {
                    no_controller = Some(e);
                }
                answer => {
                    self.current.store(i, Relaxed);
                    return answer;
                }
            }
        }
        Err(no_controller.unwrap_or_else(|| CliError::Transport {
            url: self.bases.join(","),
            why: unreachable.join("; "),
        }))
    }

    fn exchange_with(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<String>,
        limit: u64,
    ) -> Result<Vec<u8>, CliError> {
        let url = format!("{base}{path}");
        let transport = |why: String| CliError::Transport {
            url: base.to_owned(),
            why,
        };
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(body.unwrap_or_default())
            .map_err(|e| transport(e.to_string()))?;
        let mut resp = self.agent.run(req).map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| transport(e.to_string()))?;
        if status >= 400 {
            let text = String::from_utf8_lossy(&bytes);
            let error = serde_json::from_str::<ApiError>(&text).unwrap_or(ApiError {
                message: format!("{method} {path} failed with HTTP {status}"),
                cause: (!text.trim().is_empty()).then(|| text.trim().to_owned()),
                correction: None,
            });
            return Err(CliError::Api { status, error });
        }
        Ok(bytes)
    }

    fn decode<T: DeserializeOwned>(&self, text: &str) -> Result<T, CliError> {
        serde_json::from_str(text).map_err(|e| CliError::Answer {
            url: self.base().to_owned(),
            why: e.to_string(),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let text = self.call("GET", path, None)?;
        self.decode(&text)
    }

    /// A plain-text answer, as it comes.
    pub fn get_text(&self, path: &str) -> Result<String, CliError> {
        self.call("GET", path, None)
    }

    pub fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let body = serde_json::to_string(body).expect("serialisable");
        let text = self.call(method, path, Some(body))?;
        self.decode(&text)
    }

    /// A POST that carries no body: an action on the object the path names.
    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let text = self.call("POST", path, None)?;
        self.decode(&text)
    }

    pub fn delete(&self, path: &str) -> Result<(), CliError> {
        self.call("DELETE", path, None).map(|_| ())
    }
}

/// The storage plugins reach Tandem through the CLI's client.
impl tandem_xapi::tandem::Transport for Client {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<String, tandem_xapi::tandem::ApiFailure> {
        Client::call(self, method, path, body).map_err(|e| match e {
            CliError::Api { status, error } => tandem_xapi::tandem::ApiFailure {
                status: Some(status),
                error,
            },
            other => tandem_xapi::tandem::ApiFailure {
                status: None,
                error: ApiError {
                    message: other.to_string(),
                    cause: None,
                    correction: None,
                },
            },
        })
    }
}
