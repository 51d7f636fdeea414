//! The `[[jobs]]` tables: scheduled jobs, validated so that a half-understood
//! schedule never runs. Errors name the job and the key
//! (`jobs[publish].cron: ...`). Built-in jobs (`tandem.*`) are on by default;
//! a `[[jobs]]` table with a built-in's name overrides its schedule.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::ConfigError;
use super::units::parse_duration;

/// Where a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOn {
    /// Only on the leader, once per scheduled time.
    Leader,
    /// Exactly one host per scheduled time, whichever claims it.
    Once,
    /// Every host, at every scheduled time.
    EveryHost,
}

impl RunOn {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOn::Leader => "leader",
            RunOn::Once => "once",
            RunOn::EveryHost => "every-host",
        }
    }
}

/// What to do with scheduled times missed while no host could run them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misfire {
    /// Forget them; run at the next scheduled time.
    Skip,
    /// Run once, for the latest missed time.
    RunOnce,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::RunOnce => "run-once",
        }
    }
}

/// When a job runs.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// At every multiple of the period since the Unix epoch (so every host
    /// computes the same times).
    Every(Duration),
    Cron {
        expr: String,
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
}

impl Schedule {
    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(period) => {
                let p = period.as_millis() as i64;
                let ms = t.timestamp_millis();
                let next = (ms.div_euclid(p) + 1) * p;
                Utc.timestamp_millis_opt(next).single()
            }
            Schedule::Cron { cron, tz, .. } => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// As written in the config.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Every(d) => format!("every {}", humantime::format_duration(*d)),
            Schedule::Cron { expr, tz, .. } => format!("cron \"{expr}\" ({tz})"),
        }
    }
}

/// A built-in job's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    PruneLog,
    MarkStaleHosts,
    PruneJobHistory,
    ExpireUploads,
}

#[derive(Clone, Debug)]
pub struct HttpAction {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

#[derive(Clone, Debug)]
pub struct CommandAction {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub enum Action {
    Http(HttpAction),
    Command(CommandAction),
    Builtin(Builtin),
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Http(_) => "http",
            Action::Command(_) => "command",
            Action::Builtin(_) => "builtin",
        }
    }
}

/// One validated job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub name: String,
    pub schedule: Schedule,
    pub run_on: RunOn,
    pub action: Action,
    pub timeout: Duration,
    pub misfire: Misfire,
    /// How late a scheduled time may be and still run on time.
    pub misfire_grace: Duration,
    pub overlap: bool,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub jitter: Duration,
    pub enabled: bool,
}

/// How late a scheduled time may be and still count as on time, unless a
/// job sets `misfire_grace`.
pub const DEFAULT_MISFIRE_GRACE: Duration = Duration::from_secs(1);

/// The built-in jobs' names.
pub const PRUNE_LOG: &str = "tandem.prune-log";
pub const MARK_STALE_HOSTS: &str = "tandem.mark-stale-hosts";
pub const PRUNE_JOB_HISTORY: &str = "tandem.prune-job-history";
pub const EXPIRE_UPLOADS: &str = "tandem.expire-uploads";

fn builtin(name: &str, every: Duration, work: Builtin) -> JobSpec {
    JobSpec {
        name: name.to_string(),
        schedule: Schedule::Every(every),
        run_on: RunOn::Leader,
        action: Action::Builtin(work),
        timeout: Duration::from_secs(300),
        misfire: Misfire::Skip,
        misfire_grace: DEFAULT_MISFIRE_GRACE,
        overlap: false,
        retries: 0,
        retry_backoff: Duration::from_secs(10),
        jitter: Duration::ZERO,
        enabled: true,
    }
}

/// The built-in jobs with their default schedules.
pub fn builtins(prune_interval: Duration, expire_every: Duration) -> Vec<JobSpec> {
    vec![
        builtin(PRUNE_LOG, prune_interval, Builtin::PruneLog),
        builtin(
            MARK_STALE_HOSTS,
            Duration::from_secs(60),
            Builtin::MarkStaleHosts,
        ),
        builtin(
            PRUNE_JOB_HISTORY,
            Duration::from_secs(3600),
            Builtin::PruneJobHistory,
        ),
        JobSpec {
            run_on: RunOn::Once,
            ..builtin(EXPIRE_UPLOADS, expire_every, Builtin::ExpireUploads)
        },
    ]
}

const JOB_KEYS: &[&str] = &[
    "name",
    "every",
    "cron",
    "timezone",
    "run_on",
    "http",
    "command",
    "timeout",
    "misfire",
    "misfire_grace",
    "overlap",
    "retries",
    "retry_backoff",
    "jitter",
    "enabled",
];
const BUILTIN_KEYS: &[&str] = &["name", "every", "cron", "timezone", "timeout", "enabled"];
const HTTP_KEYS: &[&str] = &["method", "url", "headers", "body"];
const COMMAND_KEYS: &[&str] = &["argv", "env", "dir"];

/// A job name: what goes into the database, URLs and metric labels.
pub fn valid_job_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// Validates the `[[jobs]]` tables and merges them with the built-ins.
pub fn parse(
    tables: &[toml::Table],
    prune_interval: Duration,
    expire_every: Duration,
) -> Result<Vec<JobSpec>, ConfigError> {
    let mut jobs = builtins(prune_interval, expire_every);
    let mut seen = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let name = match t.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(ConfigError::key(
                    format!("jobs[{i}].name"),
                    "must be a string",
                ));
            }
            None => return Err(ConfigError::key(format!("jobs[{i}].name"), "is missing")),
        };
        if !valid_job_name(&name) {
            return Err(ConfigError::key(
                format!("jobs[{i}].name"),
                format!("{name:?} is not a valid job name ([a-z0-9][a-z0-9._-]{{0,63}})"),
            ));
        }
        if seen.contains(&name) {
            return Err(ConfigError::key(
                format!("jobs[{name}].name"),
                "is declared twice",
            ));
        }
        seen.push(name.clone());
        let job = Job { name: &name, t };
        if let Some(existing) = jobs.iter_mut().find(|j| j.name == name) {
            job.override_builtin(existing)?;
        } else if name.starts_with("tandem.") {
            return Err(job.err(
                "name",
                "names starting with \"tandem.\" are reserved for the built-in jobs (tandem.prune-log, tandem.mark-stale-hosts, tandem.prune-job-history)",
            ));
        } else {
            jobs.push(job.parse()?);
        }
    }
    Ok(jobs)
}

/// One `[[jobs]]` table being read.
struct Job<'a> {
    name: &'a str,
    t: &'a toml::Table,
}

impl Job<'_> {
    fn err(&self, key: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::key(format!("jobs[{}].{key}", self.name), why)
    }

    fn check_keys(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        for k in self.t.keys() {
            if !allowed.contains(&k.as_str()) {
                let why = if JOB_KEYS.contains(&k.as_str()) {
                    "cannot be set on a built-in job".to_string()
                } else {
                    format!("unknown key (known: {})", allowed.join(", "))
                };
                return Err(self.err(k, why));
            }
        }
        Ok(())
    }

    fn str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.t.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(_) => Err(self.err(key, "must be true or false")),
        }
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.str(key)? {
            None => Ok(default),
            Some(s) => parse_duration(&s).map_err(|e| self.err(key, e)),
        }
    }

    fn schedule(&self) -> Result<Option<Schedule>, ConfigError> {
        let every = self.str("every")?;
        let cron = self.str("cron")?;
        let tz = self.str("timezone")?;
        match (every, cron) {
            (Some(_), Some(_)) => Err(self.err("cron", "set either `every` or `cron`, not both")),
            (Some(e), None) => {
                if tz.is_some() {
                    return Err(self.err("timezone", "applies to `cron` schedules only"));
                }
                let d = parse_duration(&e).map_err(|why| self.err("every", why))?;
                if d < Duration::from_secs(1) {
                    return Err(self.err("every", "must be at least 1s"));
                }
                if d > Duration::from_secs(366 * 86_400) {
                    return Err(self.err("every", "must be at most a year (use `cron` for more)"));
                }
                Ok(Some(Schedule::Every(d)))
            }
            (None, Some(expr)) => {
                let cron = croner::Cron::from_str(&expr).map_err(|e| {
                    self.err("cron", format!("{expr:?} is not a cron expression: {e}"))
                })?;
                let tz = match tz {
                    None => chrono_tz::UTC,
                    Some(name) => name.parse::<chrono_tz::Tz>().map_err(|_| {
                        self.err(
                            "timezone",
                            format!("{name:?} is not an IANA time zone like \"Europe/Paris\""),
                        )
                    })?,
                };
                let schedule = Schedule::Cron {
                    expr,
                    cron: Box::new(cron),
                    tz,
                };
                if schedule.next_after(Utc::now()).is_none() {
                    return Err(self.err("cron", "never matches a future time"));
                }
                Ok(Some(schedule))
            }
            (None, None) => {
                if tz.is_some() {
                    return Err(self.err("timezone", "applies to `cron` schedules only"));
                }
                Ok(None)
            }
        }
    }

    fn timeout(&self, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration("timeout", default)?;
        if d < Duration::from_millis(100) {
            return Err(self.err("timeout", "must be at least 100ms"));
        }
        Ok(d)
    }

    fn override_builtin(&self, job: &mut JobSpec) -> Result<(), ConfigError> {
        self.check_keys(BUILTIN_KEYS)?;
        if let Some(s) = self.schedule()? {
            job.schedule = s;
        }
        job.timeout = self.timeout(job.timeout)?;
        job.enabled = self.bool("enabled", true)?;
        Ok(())
    }

    fn parse(&self) -> Result<JobSpec, ConfigError> {
        self.check_keys(JOB_KEYS)?;
        let schedule = self.schedule()?.ok_or_else(|| {
            self.err(
                "every",
                "is missing: set `every = \"30s\"` or `cron = \"...\"`",
            )
        })?;
        let run_on = match self.str("run_on")?.as_deref() {
            None | Some("leader") => RunOn::Leader,
            Some("once") => RunOn::Once,
            Some("every-host") => RunOn::EveryHost,
            Some(other) => {
                return Err(self.err(
                    "run_on",
                    format!("{other:?} is not one of \"leader\", \"once\", \"every-host\""),
                ));
            }
        };
        let misfire = match self.str("misfire")?.as_deref() {
            None | Some("skip") => Misfire::Skip,
            Some("run-once") => Misfire::RunOnce,
            Some(other) => {
                return Err(self.err(
                    "misfire",
                    format!("{other:?} is not one of \"skip\", \"run-once\""),
                ));
            }
        };
        let misfire_grace = self.duration("misfire_grace", DEFAULT_MISFIRE_GRACE)?;
        // Under the default, an ordinary late wake-up would be a misfire.
        if misfire_grace < DEFAULT_MISFIRE_GRACE || misfire_grace > Duration::from_secs(86_400) {
            return Err(self.err("misfire_grace", "must be from 1s to 1d"));
        }
        let action = match (self.t.get("http"), self.t.get("command")) {
            (Some(_), Some(_)) => {
                return Err(self.err("command", "set either `http` or `command`, not both"));
            }
            (Some(h), None) => Action::Http(self.http(h)?),
            (None, Some(c)) => Action::Command(self.command(c)?),
            (None, None) => {
                return Err(self.err(
                    "http",
                    "is missing: a job needs an action, `http = { url = \"http://127.0.0.1/...\" }` or `command = { argv = [...] }`",
                ));
            }
        };
        let retries = match self.t.get("retries") {
            None => 0,
            Some(toml::Value::Integer(n)) if (0..=100).contains(n) => *n as u32,
            Some(_) => return Err(self.err("retries", "must be an integer from 0 to 100")),
        };
        let retry_backoff = self.duration("retry_backoff", Duration::from_secs(10))?;
        if retry_backoff < Duration::from_millis(10) {
            return Err(self.err("retry_backoff", "must be at least 10ms"));
        }
        Ok(JobSpec {
            name: self.name.to_string(),
            schedule,
            run_on,
            action,
            timeout: self.timeout(Duration::from_secs(300))?,
            misfire,
            misfire_grace,
            overlap: self.bool("overlap", false)?,
            retries,
            retry_backoff,
            jitter: self.duration("jitter", Duration::ZERO)?,
            enabled: self.bool("enabled", true)?,
        })
    }

    fn table<'t>(
        &self,
        key: &str,
        v: &'t toml::Value,
        allowed: &[&str],
    ) -> Result<&'t toml::Table, ConfigError> {
        let t = v
            .as_table()
            .ok_or_else(|| self.err(key, "must be a table, e.g. `http = { url = \"...\" }`"))?;
        for k in t.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(self.err(
                    &format!("{key}.{k}"),
                    format!("unknown key (known: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(t)
    }

    fn string_map(
        &self,
        key: &str,
        v: Option<&toml::Value>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let t = v
            .as_table()
            .ok_or_else(|| self.err(key, "must be a table of strings"))?;
        t.iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(self.err(&format!("{key}.{k}"), "must be a string")),
            })
            .collect()
    }

    fn http(&self, v: &toml::Value) -> Result<HttpAction, ConfigError> {
        let t = self.table("http", v, HTTP_KEYS)?;
        let get = |k: &str| match t.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(&format!("http.{k}"), "must be a string")),
        };
        let url = get("url")?.ok_or_else(|| self.err("http.url", "is missing"))?;
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| self.err("http.url", format!("{url:?} is not a URL: {e}")))?;
        if parsed.scheme() != "http" {
            return Err(self.err(
                "http.url",
                "must be an http:// URL (tandem calls the app on this host, normally http://127.0.0.1/...)",
            ));
        }
        let method = get("method")?
            .unwrap_or_else(|| "POST".to_string())
            .to_ascii_uppercase();
        if reqwest::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            return Err(self.err("http.method", format!("{method:?} is not an HTTP method")));
        }
        let headers = self.string_map("http.headers", t.get("headers"))?;
        for (k, v) in &headers {
            if k.to_ascii_lowercase().starts_with("tandem-") {
                return Err(self.err(
                    &format!("http.headers.{k}"),
                    "Tandem-* headers are set by tandem itself",
                ));
            }
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(self.err(&format!("http.headers.{k}"), "is not a valid header"));
            }
        }
        Ok(HttpAction {
            method,
            url,
            headers,
            body: get("body")?,
        })
    }

    fn command(&self, v: &toml::Value) -> Result<CommandAction, ConfigError> {
        let t = self.table("command", v, COMMAND_KEYS)?;
        let argv: Vec<String> = match t.get("argv") {
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| self.err("command.argv", "must be an array of strings"))?,
            Some(_) => return Err(self.err("command.argv", "must be an array of strings")),
            None => {
                return Err(self.err(
                    "command.argv",
                    "is missing, e.g. argv = [\"php\", \"artisan\", \"schedule:run\"]",
                ));
            }
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(self.err("command.argv", "must name a program"));
        }
        let dir = match t.get("dir") {
            None => None,
            Some(toml::Value::String(s)) if PathBuf::from(s).is_absolute() => {
                Some(PathBuf::from(s))
            }
            Some(_) => return Err(self.err("command.dir", "must be an absolute path")),
        };
        Ok(CommandAction {
            argv,
            env: self.string_map("command.env", t.get("env"))?,
            dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(text: &str) -> Result<Vec<JobSpec>, ConfigError> {
        #[derive(serde::Deserialize)]
        struct J {
            jobs: Vec<toml::Table>,
        }
        let j: J = toml::from_str(text).unwrap();
        parse(&j.jobs, Duration::from_secs(60), Duration::from_secs(60))
    }

    fn err(text: &str) -> String {
        jobs(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_jobs_and_keeps_builtins() {
        let all = jobs(
            r#"
            [[jobs]]
            name = "publish"
            cron = "*/5 * * * * *"
            timezone = "Europe/Paris"
            run_on = "once"
            misfire = "run-once"
            misfire_grace = "30s"
            retries = 2
            http = { url = "http://127.0.0.1:8080/publish", headers = { "X-A" = "b" } }

            [[jobs]]
            name = "tandem.prune-log"
            every = "5m"
            "#,
        )
        .unwrap();
        assert_eq!(all.len(), 5);
        assert!(
            all.iter()
                .any(|j| j.name == EXPIRE_UPLOADS && j.run_on == RunOn::Once)
        );
        let p = all.iter().find(|j| j.name == "publish").unwrap();
        assert_eq!(p.run_on, RunOn::Once);
        assert_eq!(p.misfire, Misfire::RunOnce);
        assert_eq!(p.misfire_grace, Duration::from_secs(30));
        assert!(matches!(&p.action, Action::Http(h) if h.method == "POST" && h.headers.len() == 1));
        let prune = all.iter().find(|j| j.name == PRUNE_LOG).unwrap();
        assert!(matches!(prune.schedule, Schedule::Every(d) if d == Duration::from_secs(300)));
        assert_eq!(prune.misfire_grace, DEFAULT_MISFIRE_GRACE);
    }

    #[test]
    fn misfire_grace_is_bounded() {
        let job = |grace: &str| {
            format!(
                "[[jobs]]\nname = \"a\"\nevery = \"1m\"\nmisfire_grace = \"{grace}\"\ncommand = {{ argv = [\"true\"] }}"
            )
        };
        for bad in ["500ms", "2d", "soon"] {
            let e = err(&job(bad));
            assert!(e.contains("jobs[a].misfire_grace"), "{bad}: {e}");
        }
        let ok = jobs(&job("1d")).unwrap();
        let a = ok.iter().find(|j| j.name == "a").unwrap();
        assert_eq!(a.misfire_grace, Duration::from_secs(86_400));
    }

    #[test]
    fn bad_jobs_name_the_job_and_key() {
        let e = err("[[jobs]]\nname = \"a\"\ncron = \"not cron\"\ncommand = { argv = [\"true\"] }");
        assert!(e.contains("jobs[a].cron"), "{e}");
        let e = err(
            "[[jobs]]\nname = \"a\"\nevery = \"1m\"\nrun_on = \"sometimes\"\ncommand = { argv = [\"true\"] }",
        );
        assert!(e.contains("jobs[a].run_on"), "{e}");
        let e = err("[[jobs]]\nname = \"a\"\nevery = \"1m\"\nhttp = { method = \"GET\" }");
        assert!(
            e.contains("jobs[a].http.url") && e.contains("missing"),
            "{e}"
        );
        let e = err("[[jobs]]\nname = \"a\"\nevery = \"1m\"");
        assert!(e.contains("jobs[a].http"), "{e}");
        let e = err(
            "[[jobs]]\nname = \"a\"\nevery = \"1m\"\ncommand = { argv = [\"x\"] }\nfrequency = 3",
        );
        assert!(e.contains("jobs[a].frequency"), "{e}");
        let e = err("[[jobs]]\nname = \"tandem.prune-log\"\ncommand = { argv = [\"x\"] }");
        assert!(e.contains("jobs[tandem.prune-log].command"), "{e}");
        let e =
            err("[[jobs]]\nname = \"tandem.mine\"\nevery = \"1m\"\ncommand = { argv = [\"x\"] }");
        assert!(e.contains("reserved"), "{e}");
        let e = err(
            "[[jobs]]\nname = \"a\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\ncommand = { argv = [\"x\"] }",
        );
        assert!(e.contains("jobs[a].timezone"), "{e}");
        let e =
            err("[[jobs]]\nname = \"a\"\nevery = \"1m\"\nhttp = { url = \"https://example.com\" }");
        assert!(e.contains("jobs[a].http.url"), "{e}");
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let s = Schedule::Every(Duration::from_secs(30));
        let t = Utc.timestamp_opt(1_000_000_015, 0).unwrap();
        assert_eq!(s.next_after(t).unwrap().timestamp(), 1_000_000_020);
        let t = Utc.timestamp_opt(1_000_000_020, 0).unwrap();
        assert_eq!(s.next_after(t).unwrap().timestamp(), 1_000_000_050);
    }

    #[test]
    fn cron_with_seconds_and_time_zone() {
        let all = jobs(
            "[[jobs]]\nname = \"a\"\ncron = \"0 30 9 * * *\"\ntimezone = \"Asia/Tokyo\"\ncommand = { argv = [\"x\"] }",
        )
        .unwrap();
        let a = all.iter().find(|j| j.name == "a").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        // 09:30 in Tokyo is 00:30 UTC.
        assert_eq!(
            a.schedule.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 30, 0).unwrap()
        );
    }
}
