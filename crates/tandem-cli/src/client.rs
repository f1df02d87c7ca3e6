//! HTTP calls to the node or controller API, with errors a person can act on.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_api::ApiError;

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

pub enum CliError {
    /// The API answered with an error.
    Api(ApiError),
    /// The API could not be reached or answered nonsense.
    Transport { url: String, why: String },
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Api(error) => write!(f, "{error}"),
            CliError::Transport { url, why } => write!(
                f,
                "cannot talk to tandemd at {url}: {why}\n  hint: is tandemd running there? \
                 Point the CLI at it with --controller URL or TANDEM_CONTROLLER"
            ),
        }
    }
}

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, CliError> {
        let url = format!("{}{path}", self.base);
        let transport = |why: String| CliError::Transport {
            url: self.base.clone(),
            why,
        };
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(body.unwrap_or_default())
            .map_err(|e| transport(e.to_string()))?;
        let mut resp = self.agent.run(req).map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| transport(e.to_string()))?;
        if status >= 400 {
            let error = serde_json::from_str::<ApiError>(&text).unwrap_or(ApiError {
                message: format!("request failed with HTTP {status}"),
                cause: Some(text),
                correction: None,
            });
            return Err(CliError::Api(error));
        }
        Ok(text)
    }

    fn decode<T: DeserializeOwned>(&self, text: &str) -> Result<T, CliError> {
        serde_json::from_str(text).map_err(|e| CliError::Transport {
            url: self.base.clone(),
            why: format!("unexpected answer ({e}); are the CLI and tandemd the same version?"),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let text = self.call("GET", path, None)?;
        self.decode(&text)
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

    pub fn delete(&self, path: &str) -> Result<(), CliError> {
        self.call("DELETE", path, None).map(|_| ())
    }
}
