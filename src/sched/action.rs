//! Running a job's action: an HTTP call (normally to the app on this host)
//! or a command, under the job's timeout, keeping the tail of the output.
//! The fencing token and the scheduled time travel with every run.

use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::jobs::{CommandAction, HttpAction};

/// What a run is, as the action sees it.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub job: String,
    pub run_id: i64,
    pub attempt: i32,
    pub scheduled_for: DateTime<Utc>,
    pub fencing_token: i64,
    pub host: String,
}

impl RunContext {
    pub fn scheduled_for_text(&self) -> String {
        self.scheduled_for
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `succeeded`, `failed` or `timed_out`.
    pub state: &'static str,
    pub exit_status: Option<i32>,
    pub http_status: Option<i32>,
    pub output: String,
    pub error: Option<String>,
}

impl Outcome {
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            state: "failed",
            exit_status: None,
            http_status: None,
            output: String::new(),
            error: Some(error.into()),
        }
    }

    pub fn succeeded(output: impl Into<String>) -> Self {
        Self {
            state: "succeeded",
            exit_status: None,
            http_status: None,
            output: output.into(),
            error: None,
        }
    }

    pub fn timed_out(timeout: Duration, output: String) -> Self {
        Self {
            state: "timed_out",
            exit_status: None,
            http_status: None,
            output,
            error: Some(format!(
                "killed at its timeout ({})",
                humantime::format_duration(timeout)
            )),
        }
    }
}

/// Keeps the last `limit` bytes of what is pushed.
struct Tail {
    buf: Vec<u8>,
    limit: usize,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.limit {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// Calls the job's URL. 2xx is success.
pub async fn http(
    client: &reqwest::Client,
    a: &HttpAction,
    ctx: &RunContext,
    timeout: Duration,
    tail: usize,
) -> Outcome {
    let method = reqwest::Method::from_bytes(a.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut request = client
        .request(method, &a.url)
        .header("Tandem-Fencing-Token", ctx.fencing_token.to_string())
        .header("Tandem-Scheduled-For", ctx.scheduled_for_text())
        .header("Tandem-Job", &ctx.job)
        .header("Tandem-Run-Id", ctx.run_id.to_string())
        .header("Tandem-Attempt", ctx.attempt.to_string())
        .header("Tandem-Host", &ctx.host);
    for (k, v) in &a.headers {
        request = request.header(k, v);
    }
    if let Some(body) = &a.body {
        request = request.body(body.clone());
    }
    let call = async {
        let mut response = request.send().await?;
        let status = response.status();
        let mut out = Tail::new(tail);
        while let Some(chunk) = response.chunk().await? {
            out.push(&chunk);
        }
        Ok::<_, reqwest::Error>((status, out.text()))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Outcome::timed_out(timeout, String::new()),
        Ok(Err(e)) => Outcome::failed(format!("request to {} failed: {e}", a.url)),
        Ok(Ok((status, output))) => Outcome {
            state: if status.is_success() {
                "succeeded"
            } else {
                "failed"
            },
            exit_status: None,
            http_status: Some(i32::from(status.as_u16())),
            error: (!status.is_success()).then(|| format!("the app answered {status}")),
            output,
        },
    }
}

/// Kills a process group when dropped (a no-op if it already exited).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

async fn drain(mut r: impl AsyncRead + Unpin, tail: std::sync::Arc<std::sync::Mutex<Tail>>) {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.lock().expect("not poisoned").push(&buf[..n]),
        }
    }
}

/// Runs the job's command; exit status 0 is success. At the timeout the
/// whole process group is killed.
pub async fn command(
    a: &CommandAction,
    ctx: &RunContext,
    timeout: Duration,
    tail: usize,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(&a.argv[0]);
    // tandem's own settings (which may hold the database password) are not
    // the command's business.
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("TANDEM_") || k == "DATABASE_URL")
        {
            cmd.env_remove(k);
        }
    }
    cmd.args(&a.argv[1..])
        .envs(a.env.iter().map(|(k, v)| (k, v)))
        .env("TANDEM_FENCING_TOKEN", ctx.fencing_token.to_string())
        .env("TANDEM_SCHEDULED_FOR", ctx.scheduled_for_text())
        .env("TANDEM_JOB", &ctx.job)
        .env("TANDEM_RUN_ID", ctx.run_id.to_string())
        .env("TANDEM_ATTEMPT", ctx.attempt.to_string())
        .env("TANDEM_HOST", &ctx.host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &a.dir {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("cannot start {:?}: {e}", a.argv[0])),
    };
    // If this task is dropped (shutdown), the whole process group goes too.
    let _group = child.id().map(GroupGuard);
    let out = std::sync::Arc::new(std::sync::Mutex::new(Tail::new(tail)));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(drain(s, out.clone()))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(drain(s, out.clone()))),
    ];
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let timed_out = status.is_err();
    if timed_out {
        if let Some(pid) = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.kill().await;
    }
    for r in readers.into_iter().flatten() {
        // Grandchildren may hold the pipes open: do not wait for ever.
        let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
    }
    let output = out.lock().expect("not poisoned").text();
    match status {
        Err(_) => Outcome::timed_out(timeout, output),
        Ok(Err(e)) => Outcome::failed(format!("waiting for the command failed: {e}")),
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            let code = status.code().or_else(|| status.signal().map(|s| 128 + s));
            Outcome {
                state: if status.success() {
                    "succeeded"
                } else {
                    "failed"
                },
                exit_status: code,
                http_status: None,
                error: (!status.success()).then(|| format!("the command exited with {status}")),
                output,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RunContext {
        RunContext {
            job: "j".into(),
            run_id: 7,
            attempt: 0,
            scheduled_for: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            fencing_token: 42,
            host: "h".into(),
        }
    }

    fn sh(script: &str) -> CommandAction {
        CommandAction {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("EXTRA".into(), "x".into())],
            dir: None,
        }
    }

    #[tokio::test]
    async fn command_gets_token_and_time_and_keeps_the_tail() {
        let o = command(
            &sh("echo $TANDEM_FENCING_TOKEN $TANDEM_SCHEDULED_FOR $EXTRA; echo oops >&2; exit 3"),
            &ctx(),
            Duration::from_secs(10),
            4096,
        )
        .await;
        assert_eq!(o.state, "failed");
        assert_eq!(o.exit_status, Some(3));
        assert!(o.output.contains("42 2023-11-14T22:13:20.000Z x"), "{o:?}");
        assert!(o.output.contains("oops"), "{o:?}");

        let o = command(
            &sh("yes | head -c 100000"),
            &ctx(),
            Duration::from_secs(10),
            100,
        )
        .await;
        assert_eq!(o.state, "succeeded");
        assert_eq!(o.output.len(), 100);
    }

    #[tokio::test]
    async fn command_is_killed_at_its_timeout() {
        let started = std::time::Instant::now();
        let o = command(
            &sh("sleep 30 & sleep 30"),
            &ctx(),
            Duration::from_millis(300),
            100,
        )
        .await;
        assert_eq!(o.state, "timed_out");
        assert!(started.elapsed() < Duration::from_secs(5));
        let o = command(
            &CommandAction {
                argv: vec!["/nonexistent/program".into()],
                env: vec![],
                dir: None,
            },
            &ctx(),
            Duration::from_secs(1),
            100,
        )
        .await;
        assert_eq!(o.state, "failed");
        assert!(o.error.unwrap().contains("cannot start"));
    }
}
