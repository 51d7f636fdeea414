//! The embedded default: a private PostgreSQL under `<data_dir>/postgres`,
//! started from the machine's server binaries, listening on a unix socket
//! only, reused across restarts and stopped at shutdown. When tandem runs as
//! root, PostgreSQL (which refuses root) runs as an unprivileged user.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::DatabaseConfig;

/// The port number in the socket file name (`.s.PGSQL.<port>`); no TCP port
/// is opened.
const PORT: u16 = 5432;

/// The PostgreSQL role tandem connects as.
const ROLE: &str = "tandem";

/// Why the embedded PostgreSQL could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked for pg_ctl in {looked}); install them \
         (Debian/Ubuntu: `apt-get install postgresql`, Fedora: `dnf install postgresql-server`) \
         or set database.url to use an existing PostgreSQL"
    )]
    NoBinaries { looked: String },
    #[error("embedded PostgreSQL: {0}")]
    Failed(String),
}

/// A running embedded PostgreSQL.
#[derive(Debug)]
pub struct Embedded {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    /// Whether this process started it (else it was already running).
    started: bool,
}

/// A user to run PostgreSQL as: `(uid, gid)`.
fn lookup_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// The newest `/usr/lib/postgresql/<version>/bin` with a `pg_ctl`, preferring
/// `want_version` (the version that initialised an existing data dir).
fn find_bin_dir(root: &Path, want_version: Option<&str>) -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some(want) = want_version.and_then(|w| w.parse::<u32>().ok())
        && let Some((_, bin)) = versions.iter().find(|(v, _)| *v == want)
    {
        return Some(bin.clone());
    }
    versions.pop().map(|(_, bin)| bin)
}

fn find_on_path(env_path: Option<&str>) -> Option<PathBuf> {
    env_path?
        .split(':')
        .map(|d| Path::new(d).join("pg_ctl"))
        .find(|p| p.is_file())
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

impl Embedded {
    /// Initialises (first time) and starts PostgreSQL under `dir`, or reuses
    /// one already running there.
    pub async fn start(dir: &Path, db: &DatabaseConfig) -> Result<Self, EmbeddedError> {
        let data = dir.join("data");
        let socket_dir = dir.join("run");
        let existing_version = std::fs::read_to_string(data.join("PG_VERSION"))
            .ok()
            .map(|v| v.trim().to_string());
        let bin = match &db.embedded_bin_dir {
            Some(b) if b.join("pg_ctl").is_file() => b.clone(),
            Some(b) => {
                return Err(EmbeddedError::NoBinaries {
                    looked: b.display().to_string(),
                });
            }
            None => find_bin_dir(
                Path::new("/usr/lib/postgresql"),
                existing_version.as_deref(),
            )
            .or_else(|| find_on_path(std::env::var("PATH").ok().as_deref()))
            .ok_or_else(|| EmbeddedError::NoBinaries {
                looked: "/usr/lib/postgresql/*/bin and PATH".into(),
            })?,
        };
        let socket_path_len = socket_dir.as_os_str().len() + ".s.PGSQL.5432".len() + 1;
        if socket_path_len > 100 {
            return Err(EmbeddedError::Failed(format!(
                "the socket path under {} would be too long for a unix socket; choose a shorter data_dir",
                socket_dir.display()
            )));
        }

        let run_as = if rustix::process::geteuid().is_root() {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let candidates: Vec<&str> = match &db.embedded_user {
                Some(u) => vec![u.as_str()],
                None => vec!["postgres", "nobody"],
            };
            let found = candidates.iter().find_map(|u| lookup_user(&passwd, u));
            match found {
                Some(ids) if ids.0 != 0 => Some(ids),
                _ => {
                    return Err(EmbeddedError::Failed(format!(
                        "tandem runs as root and PostgreSQL refuses to; none of the users {candidates:?} \
                         exists (set database.embedded_user)"
                    )));
                }
            }
        } else {
            None
        };

        let fail = |what: &str, e: std::io::Error| EmbeddedError::Failed(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create its directory", e))?;
        std::fs::create_dir_all(&socket_dir)
            .map_err(|e| fail("cannot create its socket directory", e))?;
        if let Some((uid, gid)) = run_as {
            for p in [dir, socket_dir.as_path()] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| fail(&format!("cannot hand {} to uid {uid}", p.display()), e))?;
            }
        }

        let mut me = Self {
            bin,
            data,
            socket_dir,
            run_as,
            started: false,
        };
        if existing_version.is_none() {
            me.initdb(dir).await?;
        }
        if me.running().await {
            tracing::info!(data = %me.data.display(), "reusing the embedded PostgreSQL already running");
        } else {
            me.pg_ctl_start(dir).await?;
            me.started = true;
        }
        Ok(me)
    }

    fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .kill_on_drop(false);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    async fn initdb(&self, dir: &Path) -> Result<(), EmbeddedError> {
        if self.data.exists() {
            // A half-made cluster from an interrupted first start.
            std::fs::remove_dir_all(&self.data).map_err(|e| {
                EmbeddedError::Failed(format!("cannot remove a partial data dir: {e}"))
            })?;
        }
        tracing::info!(data = %self.data.display(), bin = %self.bin.display(), "initialising the embedded PostgreSQL");
        let out = self
            .command("initdb", dir)
            .arg("-D")
            .arg(&self.data)
            .args(["-U", ROLE, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .await
            .map_err(|e| EmbeddedError::Failed(format!("cannot run initdb: {e}")))?;
        if !out.status.success() {
            return Err(EmbeddedError::Failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn running(&self) -> bool {
        self.command("pg_ctl", &self.socket_dir)
            .arg("status")
            .arg("-D")
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    async fn pg_ctl_start(&self, dir: &Path) -> Result<(), EmbeddedError> {
        let options = format!(
            "-c listen_addresses='' -k {} -p {PORT} -c unix_socket_permissions=0700 -c max_connections=50 -c jit=off",
            self.socket_dir.display()
        );
        let log = dir.join("postgres.log");
        let out = self
            .command("pg_ctl", dir)
            .arg("start")
            .arg("-w")
            .args(["-t", "60"])
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options)
            .output()
            .await
            .map_err(|e| EmbeddedError::Failed(format!("cannot run pg_ctl: {e}")))?;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(EmbeddedError::Failed(format!(
                "pg_ctl start failed: {} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        tracing::info!(socket_dir = %self.socket_dir.display(), "embedded PostgreSQL started");
        Ok(())
    }

    /// The connection settings (unix socket, trust auth).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir);
        cfg.port(PORT);
        cfg.user(ROLE);
        cfg.dbname("postgres");
        cfg
    }

    /// Stops PostgreSQL (fast shutdown).
    pub async fn stop(&self) {
        let result = self
            .command("pg_ctl", &self.socket_dir)
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w"])
            .stdout(Stdio::null())
            .output()
            .await;
        match result {
            Ok(out) if out.status.success() => tracing::info!("embedded PostgreSQL stopped"),
            Ok(out) => tracing::warn!(
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "stopping the embedded PostgreSQL failed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot run pg_ctl stop"),
        }
    }

    /// Whether this process started it (rather than finding it running).
    pub fn started_here(&self) -> bool {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104::/var/lib/postgresql:/bin/bash\n";
        assert_eq!(lookup_user(passwd, "postgres"), Some((101, 104)));
        assert_eq!(lookup_user(passwd, "nobody"), None);
    }

    #[test]
    fn bin_dir_prefers_the_data_dirs_version() {
        let d = tempfile::tempdir().unwrap();
        for v in ["13", "15", "16"] {
            let bin = d.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("pg_ctl"), "").unwrap();
        }
        std::fs::create_dir_all(d.path().join("17/bin")).unwrap(); // no pg_ctl
        assert_eq!(
            find_bin_dir(d.path(), None).unwrap(),
            d.path().join("16/bin")
        );
        assert_eq!(
            find_bin_dir(d.path(), Some("15")).unwrap(),
            d.path().join("15/bin")
        );
        assert_eq!(
            find_bin_dir(d.path(), Some("9")).unwrap(),
            d.path().join("16/bin")
        );
        assert_eq!(find_bin_dir(&d.path().join("none"), None), None);
    }
}
