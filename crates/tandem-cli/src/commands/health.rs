//! `tandem health`: everything that needs attention, with what to do about it. The exit
//! code is for monitoring: 0 all good, 1 warnings, 2 errors (a controller that cannot be
//! asked is an error).

use tandem_api::{Finding, Health, Severity};

use super::{Output, emit};
use crate::client::{CliError, Client};

/// Asks the controller and prints its findings; returns the exit code.
pub fn run(api: &Client, out: Output) -> u8 {
    let mut health = api
        .get::<Health>("/v1/health")
        .unwrap_or_else(|e| unreachable_controller(api.base(), &e));
    if health
        .findings
        .iter()
        .all(|f| !f.object.starts_with("controller "))
    {
        let srs = super::sr::findings(api);
        if !srs.is_empty() && health.severity == Severity::Ok {
            health.severity = Severity::Warning;
        }
        health.findings.extend(srs);
    }
    emit(out, &health, report);
    exit_code(&health)
}

/// The controller's failure to answer as a health finding, so scripts reading the JSON
/// and people reading the report see it like any other.
fn unreachable_controller(url: &str, error: &CliError) -> Health {
    let (message, correction) = match error {
        // The answer says what is wrong there (e.g. the node runs no controller).
        CliError::Api { error: e, .. } => (
            format!(
                "controller unreachable: {}{}",
                e.message,
                e.cause
                    .as_ref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            ),
            e.correction.clone().unwrap_or_else(|| {
                "point the CLI at the node running `tandemd --controller` with --controller URL \
                 or TANDEM_CONTROLLER"
                    .into()
            }),
        ),
        CliError::Transport { why, .. } | CliError::Answer { why, .. } => (
            format!("controller unreachable: {why}"),
            "start `tandemd --controller` there, or point the CLI at the node running it with \
             --controller URL or TANDEM_CONTROLLER"
                .into(),
        ),
    };
    Health {
        severity: Severity::Error,
        findings: vec![Finding {
            severity: Severity::Error,
            object: format!("controller {url}"),
            message,
            correction,
        }],
    }
}

fn rank(severity: Severity) -> u8 {
    match severity {
        Severity::Ok => 0,
        Severity::Warning => 1,
        Severity::Error => 2,
    }
}

/// 0 when all is well, 1 with warnings, 2 with errors: the worst of the overall severity
/// and of every finding.
pub fn exit_code(health: &Health) -> u8 {
    health
        .findings
        .iter()
        .map(|f| rank(f.severity))
        .fold(rank(health.severity), u8::max)
}

fn report(health: &Health) -> String {
    if health.findings.is_empty() {
        return match health.severity {
            Severity::Ok => "all good\n".into(),
            s => format!("{s}: the controller gave no details\n"),
        };
    }
    let width = health
        .findings
        .iter()
        .map(|f| f.severity.as_str().len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for f in &health.findings {
        let severity = f.severity.as_str();
        text += &format!("{severity:<width$}  {}: {}\n", f.object, f.message);
        if !f.correction.is_empty() {
            text += &format!("{:<width$}  hint: {}\n", "", f.correction);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity) -> Finding {
        Finding {
            severity,
            object: "volume vm1".into(),
            message: "replica on n2 is Outdated".into(),
            correction: "bring node n2 back online".into(),
        }
    }

    #[test]
    fn exit_code_is_the_worst_severity() {
        let health = |severity, findings| Health { severity, findings };
        assert_eq!(exit_code(&health(Severity::Ok, vec![])), 0);
        assert_eq!(
            exit_code(&health(Severity::Warning, vec![finding(Severity::Warning)])),
            1
        );
        assert_eq!(
            exit_code(&health(
                Severity::Error,
                vec![finding(Severity::Warning), finding(Severity::Error)]
            )),
            2
        );
        // A finding worse than the summary still counts.
        assert_eq!(
            exit_code(&health(Severity::Ok, vec![finding(Severity::Error)])),
            2
        );
    }

    #[test]
    fn findings_print_with_their_hint() {
        let health = Health {
            severity: Severity::Error,
            findings: vec![finding(Severity::Warning), finding(Severity::Error)],
        };
        assert_eq!(
            report(&health),
            "Warning  volume vm1: replica on n2 is Outdated\n         hint: bring node n2 back online\n\
             Error    volume vm1: replica on n2 is Outdated\n         hint: bring node n2 back online\n"
        );
        let ok = Health {
            severity: Severity::Ok,
            findings: vec![],
        };
        assert_eq!(report(&ok), "all good\n");
    }

    #[test]
    fn an_unreachable_controller_is_an_error_finding() {
        let error = CliError::Transport {
            url: "http://127.0.0.1:1".into(),
            why: "connection refused".into(),
        };
        let health = unreachable_controller("http://127.0.0.1:1", &error);
        assert_eq!(exit_code(&health), 2);
        let f = &health.findings[0];
        assert_eq!(f.object, "controller http://127.0.0.1:1");
        assert!(
            f.message.starts_with("controller unreachable"),
            "{}",
            f.message
        );
        assert!(f.correction.contains("TANDEM_CONTROLLER"));
    }
}
