//! A real S3-compatible server for the uploads tests: moto's server
//! (installed into target/tools/moto by scripts/install-test-deps.sh),
//! started on loopback. It keeps its data in memory.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub bucket: String,
    http: reqwest::Client,
}

fn moto_server() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/moto/bin/moto_server");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/install-test-deps.sh",
        p.display()
    );
    p
}

impl S3Server {
    /// Starts the server and creates `bucket`.
    pub async fn start(bucket: &str) -> S3Server {
        let mut s = S3Server {
            child: None,
            port: super::free_port(),
            bucket: bucket.to_string(),
            http: reqwest::Client::new(),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("can start moto_server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = self
            .http
            .put(format!("{}/{}", self.endpoint(), self.bucket))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "cannot create the bucket: {}",
            r.status()
        );
    }

    /// Stops the server (its data is lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the bucket re-created empty.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points a tandem at this server.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (
                "TANDEM_UPLOADS_STORE".into(),
                format!("s3://{}/{prefix}", self.bucket),
            ),
            ("TANDEM_UPLOADS_ENDPOINT".into(), self.endpoint()),
            ("TANDEM_UPLOADS_REGION".into(), "us-east-1".into()),
            ("TANDEM_UPLOADS_ALLOW_HTTP".into(), "true".into()),
            ("TANDEM_UPLOADS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ]
    }

    /// The text of a GET on the bucket with `query`.
    async fn bucket_text(&self, query: &str) -> String {
        let url = format!("{}/{}?{query}", self.endpoint(), self.bucket);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Every object key in the bucket.
    pub async fn keys(&self) -> Vec<String> {
        tags(&self.bucket_text("list-type=2").await, "Key")
    }

    /// The keys of the open multipart uploads.
    pub async fn multipart_uploads(&self) -> Vec<String> {
        let text = self.bucket_text("uploads").await;
        text.split("<Upload>")
            .skip(1)
            .flat_map(|u| tags(u, "Key"))
            .collect()
    }
}

fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split_once(&close).map(|(k, _)| k.to_string()))
        .collect()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
