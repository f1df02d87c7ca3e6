//! The real NBD clients, run the way the tests need them: qemu-io (one-shot, checked, or
//! interactive), nbdsh (with a Python that has the libnbd bindings), and fio with a JSON
//! report.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{json, output, run, wait_exit};

/// `qemu-io <opts> -c <command>... <image>`: `image` is the image's arguments (a URI,
/// or `--image-opts` and its options).
pub fn qemu_io_command(opts: &[&str], commands: &[&str], image: &[&str]) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args(opts);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.args(image);
    cmd
}

/// Runs a qemu-io command line: `Ok(stdout)` when it succeeded and no command reported a
/// failure (qemu-io goes on after a failed command), else `Err` with its exit status and
/// both outputs.
pub fn qemu_io_result(cmd: &mut Command) -> Result<String, String> {
    let out = output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !stdout.contains("failed") && !stderr.contains("failed") {
        Ok(stdout)
    } else {
        Err(format!(
            "{}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        ))
    }
}

/// `qemu-io -f raw <opts> -c <command>... <uri>`; panics unless it succeeds and no
/// command reported a failure; returns stdout.
pub fn qemu_io_with(opts: &[&str], uri: &str, commands: &[&str]) -> String {
    let opts = [&["-f", "raw"][..], opts].concat();
    qemu_io_result(&mut qemu_io_command(&opts, commands, &[uri]))
        .unwrap_or_else(|e| panic!("qemu-io {opts:?} {commands:?} on {uri}: {e}"))
}

/// `qemu-io -f raw -c <command>... <uri>`; panics unless it succeeds and no command
/// reported a failure; returns stdout.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    qemu_io_with(&[], uri, commands)
}

/// `nbdsh`, with the system Python first on `PATH`: nbdsh runs `python3 -m nbd`, and the
/// libnbd bindings live in the distribution's Python, not in the first `python3` of an
/// inherited `PATH` (a pyenv one, say).
pub fn nbdsh() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", format!("/usr/bin:/bin:{path}"));
    cmd
}

/// An nbdsh client that ran a script and then holds its connection open until dropped.
pub struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl HeldClient {
    /// Connects to `uri`, runs `script`, and returns once the script is done (it must not
    /// print anything itself).
    pub fn start(uri: &str, script: &str) -> HeldClient {
        HeldClient::spawn(&["-u", uri], script)
    }

    /// Like [`HeldClient::start`], for a script that connects `h` itself.
    pub fn start_unconnected(script: &str) -> HeldClient {
        HeldClient::spawn(&[], script)
    }

    fn spawn(args: &[&str], script: &str) -> HeldClient {
        let code = format!("{script}\nprint('ready', flush=True)\nimport sys\nsys.stdin.read()\n");
        let mut child = nbdsh()
            .args(args)
            .arg("-c")
            .arg(code)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nbdsh");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "nbdsh did not get ready (said {line:?}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        HeldClient { child, stdin }
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `fio` (a command with its job options) with a JSON report written to `report`;
/// panics unless it succeeds; returns the report's jobs.
pub fn fio_jobs(fio: &mut Command, report: &Path) -> Vec<Value> {
    run(fio
        .arg("--output-format=json")
        .arg(format!("--output={}", report.display())));
    let text = std::fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("fio report {}: {e}", report.display()));
    json(&text)["jobs"].as_array().expect("jobs").clone()
}

/// An interactive `qemu-io`: one command at a time, each answered by its output once
/// the next prompt appears, or not within a timeout (the command hangs; its output can
/// still be awaited with [`QemuIo::wait`]).
pub struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    /// The command whose answer has not arrived yet.
    busy: bool,
}

const PROMPT: &[u8] = b"qemu-io> ";

impl QemuIo {
    /// Spawns `cmd` (a qemu-io without `-c`) and waits for its first prompt.
    pub fn spawn(cmd: &mut Command) -> QemuIo {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let (tx, output) = channel();
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        let mut session = QemuIo {
            stdin: child.stdin.take(),
            child,
            output,
            pending: Vec::new(),
            busy: true,
        };
        if let Some(text) = session.wait(Duration::from_secs(20)) {
            assert!(
                text.trim().is_empty(),
                "qemu-io said at start: {text}; exit: {:?}",
                session.child.try_wait()
            );
        } else {
            let _ = session.child.kill();
            panic!(
                "qemu-io did not start ({cmd:?}): {}",
                String::from_utf8_lossy(&session.pending)
            );
        }
        session
    }

    /// Sends one command and returns its output, or `None` if it has not finished
    /// within `timeout`.
    pub fn command(&mut self, command: &str, timeout: Duration) -> Option<String> {
        assert!(!self.busy, "the previous command has not finished");
        let stdin = self.stdin.as_mut().expect("qemu-io stdin open");
        writeln!(stdin, "{command}").expect("qemu-io stdin");
        stdin.flush().expect("qemu-io stdin");
        self.busy = true;
        self.wait(timeout)
    }

    /// Waits for the answer of the command in progress (or for the first prompt).
    pub fn wait(&mut self, timeout: Duration) -> Option<String> {
        assert!(self.busy, "no command in progress");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.pending.windows(PROMPT.len()).position(|w| w == PROMPT) {
                let text = String::from_utf8_lossy(&self.pending[..at]).into_owned();
                self.pending.drain(..at + PROMPT.len());
                self.busy = false;
                return Some(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.pending.extend(chunk),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    if self.pending.is_empty() {
                        return None;
                    }
                    // Exited: whatever it said last is the answer.
                    let text = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    self.busy = false;
                    return Some(text);
                }
            }
        }
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Quits (closing the export) and waits up to 20 s for the exit; a qemu-io still
    /// busy with a command, or not exiting, is killed instead. `None` when killed.
    pub fn quit(mut self) -> Option<ExitStatus> {
        if !self.busy {
            let _ = writeln!(self.stdin.as_mut().unwrap(), "quit");
            self.stdin.take();
            if let Some(status) = wait_exit(&mut self.child, Duration::from_secs(20)) {
                return Some(status);
            }
        }
        self.kill();
        None
    }

    /// SIGKILL: the client dies with whatever it had in flight.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        self.kill();
    }
}
