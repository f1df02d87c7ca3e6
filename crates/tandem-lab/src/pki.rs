//! Throw-away X.509 certificates made with openssl, for TLS tests.

use std::path::Path;
use std::process::Command;

use crate::run;

pub fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// `openssl req <kind>` with a new P-256 key, `<name>-key.pem`, writing `out`, then
/// `rest` of the arguments.
fn new_key(dir: &Path, kind: &str, name: &str, out: &str, rest: &[&str]) {
    let key = format!("{name}-key.pem");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let args = [
        &["req", kind][..],
        &ec,
        &["-keyout", &key, "-out", out],
        rest,
    ]
    .concat();
    openssl(dir, &args);
}

/// A self-signed CA: `<name>-cert.pem`, `<name>-key.pem`.
pub fn make_ca(dir: &Path, name: &str) {
    new_key(
        dir,
        "-x509",
        name,
        &format!("{name}-cert.pem"),
        &[
            "-days",
            "2",
            "-subj",
            &format!("/CN=Tandem test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A key and a certificate signed by CA `ca`, with the given extensions.
pub fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    new_key(
        dir,
        "-new",
        name,
        &format!("{name}.csr"),
        &["-subj", &format!("/CN={cn}")],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}
