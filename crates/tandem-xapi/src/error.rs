//! Failures as xapi-storage-script expects them: a code, parameters an administrator
//! can act on, printed as JSON on stdout with a non-zero exit.

use serde_json::json;

use crate::tandem::ApiFailure;

/// What went wrong, as the first word an administrator sees (the error's code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The call's parameters are wrong: unknown or missing keys, wrong types, bad values.
    InvalidArgument,
    /// The method is not one this plugin implements.
    Unimplemented,
    SrDoesNotExist,
    VolumeDoesNotExist,
    /// The volume is attached, activated or otherwise busy.
    VolumeInUse,
    /// The pools lack room.
    NoSpace,
    /// The Tandem controller cannot be reached.
    NoController,
    /// Another call holds the SR for longer than a call may wait.
    SrBusy,
    /// Another host has the volume activated (xapi redirects on it).
    ActivatedOnAnotherHost,
    /// Tandem refused or failed the operation for another reason.
    BackendFailure,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "Invalid_argument",
            Kind::Unimplemented => "Unimplemented",
            Kind::SrDoesNotExist => "SR_does_not_exist",
            Kind::VolumeDoesNotExist => "Volume_does_not_exist",
            Kind::VolumeInUse => "Volume_in_use",
            Kind::NoSpace => "No_space",
            Kind::NoController => "No_controller",
            Kind::SrBusy => "SR_busy",
            Kind::ActivatedOnAnotherHost => "Activated_on_another_host",
            Kind::BackendFailure => "SR_BACKEND_FAILURE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XapiError {
    pub kind: Kind,
    pub params: Vec<String>,
}

impl XapiError {
    pub fn new(kind: Kind, params: impl IntoIterator<Item = impl Into<String>>) -> XapiError {
        XapiError {
            kind,
            params: params.into_iter().map(Into::into).collect(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> XapiError {
        XapiError::new(Kind::InvalidArgument, [message.into()])
    }

    pub fn backend(message: impl Into<String>) -> XapiError {
        XapiError::new(Kind::BackendFailure, [message.into()])
    }

    pub fn no_volume(key: &str) -> XapiError {
        XapiError::new(
            Kind::VolumeDoesNotExist,
            [key.to_owned(), format!("the SR has no volume {key}")],
        )
    }

    /// xapi recognises exactly `["Activated_on_another_host", HOST]` and redirects.
    pub fn activated_elsewhere(host: &str) -> XapiError {
        XapiError::new(
            Kind::ActivatedOnAnotherHost,
            ["Activated_on_another_host".to_owned(), host.to_owned()],
        )
    }

    /// A failed call to Tandem's API, classified by what the administrator can do.
    pub fn from_api(f: ApiFailure) -> XapiError {
        let mut text = f.error.message.clone();
        if let Some(cause) = &f.error.cause {
            text.push_str(&format!(": {cause}"));
        }
        // Placement names each pool's free space against the size asked ("pool default
        // has 512M free, needs 1G"); a node's file system says ENOSPC in its words.
        let kind = match f.status {
            None => Kind::NoController,
            _ if text.contains(" free, needs ") || text.contains("No space left on device") => {
                Kind::NoSpace
            }
            _ => Kind::BackendFailure,
        };
        let mut params = vec![text];
        params.extend(f.error.correction.map(|hint| format!("hint: {hint}")));
        XapiError::new(kind, params)
    }

    /// The JSON xapi-storage-script parses on a non-zero exit.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "code": self.kind.code(),
            "params": self.params,
            "backtrace": { "error": self.params.join(": "), "files": [], "lines": [] },
        })
    }
}

impl std::fmt::Display for XapiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.params.join(": "))
    }
}
