//! TLS to PostgreSQL against a real server: a private cluster started by the test with `ssl=on` and a
//! certificate chain the test makes with rcgen (nothing secret is committed). Each `sslmode` behaves as
//! libpq's does, and every connection of a running service (pool, listener, engine) uses TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{count, eventually};
use jobqueue::db::{Connector, ErrorClass, Purpose};
use jobqueue::{Builder, Config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA and a server certificate for `localhost` signed by it, as PEM.
struct Chain {
    ca: String,
    cert: String,
    key: String,
}

fn chain(name: &str) -> Chain {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    Chain { ca: ca.pem(), cert: cert.pem(), key: key.serialize_pem() }
}

fn server_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A private PostgreSQL cluster with TLS on, stopped and removed when dropped.
struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn run(&self, program: &Path, args: &[&str]) -> std::process::Output {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).output().expect("run a PostgreSQL server binary")
    }

    fn start(chain: &Chain) -> Option<Cluster> {
        let Some(bindir) = server_bindir() else {
            eprintln!("\n*** SKIPPED: no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql ***\n");
            return None;
        };
        // initdb refuses to run as root: run the server binaries as the postgres user then.
        let as_postgres = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("jq-tls-{}", uuid::Uuid::new_v4().simple()));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = Cluster { dir: dir.clone(), bindir, port, as_postgres };
        if as_postgres {
            assert!(Command::new("chown").args(["postgres", dir.to_str().unwrap()]).status().unwrap().success());
        }
        let out = cluster.run(
            &cluster.bindir.join("initdb"),
            &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(data.join("server.crt"), &chain.cert).unwrap();
        std::fs::write(data.join("server.key"), &chain.key).unwrap();
        let mut perms = std::fs::metadata(data.join("server.key")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(data.join("server.key"), perms).unwrap();
        if as_postgres {
            assert!(Command::new("chown").args(["-R", "postgres", dir.to_str().unwrap()]).status().unwrap().success());
        }
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on -c fsync=off -c max_connections=50",
            dir.display()
        );
        let log = data.join("server.log");
        let out = cluster.run(
            &cluster.bindir.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "-o", &options, "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(cluster)
    }

    fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}?{params}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        self.run(&self.bindir.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the connection made by `url` is encrypted, or the error it got.
async fn encrypted(url: &str) -> Result<bool, jobqueue::db::DbError> {
    let connector = Connector::new(url, Duration::from_secs(10))?;
    let client = connector.connect(Purpose::Admin, &jobqueue::logging::discard()).await?;
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_behaves_as_libpq_and_the_service_runs_over_tls() {
    let good = chain("jobqueue test");
    let Some(cluster) = Cluster::start(&good) else { return };
    let root = cluster.dir.join("root.pem");
    std::fs::write(&root, &good.ca).unwrap();
    let other = cluster.dir.join("other-root.pem");
    std::fs::write(&other, chain("someone else").ca).unwrap();
    let root_param = format!("sslrootcert={}", root.display());

    // disable: plain; require and prefer: encrypted without checking the certificate.
    assert!(!encrypted(&cluster.url("127.0.0.1", "postgres", "sslmode=disable")).await.unwrap());
    assert!(encrypted(&cluster.url("127.0.0.1", "postgres", "sslmode=require")).await.unwrap());
    assert!(encrypted(&cluster.url("127.0.0.1", "postgres", "sslmode=prefer")).await.unwrap());

    // verify-full: the chain and the host name.
    let full = cluster.url("localhost", "postgres", &format!("sslmode=verify-full&{root_param}"));
    assert!(encrypted(&full).await.unwrap());
    // verify-ca checks the chain only: an address the certificate does not name is fine...
    let by_ip = cluster.url("127.0.0.1", "postgres", &format!("sslmode=verify-ca&{root_param}"));
    assert!(encrypted(&by_ip).await.unwrap());
    // ...but not for verify-full.
    let wrong_name = cluster.url("127.0.0.1", "postgres", &format!("sslmode=verify-full&{root_param}"));
    let e = encrypted(&wrong_name).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal, "{e}");

    // Another root: refused, with a message that says why, and fatal (start-up must not wait on it).
    let untrusted =
        cluster.url("localhost", "postgres", &format!("sslmode=verify-full&sslrootcert={}", other.display()));
    let e = encrypted(&untrusted).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal, "{e}");
    assert!(e.to_string().contains("certificate"), "the message names the certificate problem: {e}");
    let e = encrypted(&cluster.url("localhost", "postgres", "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");

    // The whole service over verify-full: it creates its database, migrates, and runs a job through the
    // API, the listener and the engine, every one of its connections encrypted.
    let url = cluster.url("localhost", "jq", &format!("sslmode=verify-full&{root_param}"));
    let config = Config {
        database_url: url.clone(),
        bind: "127.0.0.1".parse().unwrap(),
        port: 0,
        db_pool_size: 2,
        ..Config::default()
    };
    let service =
        Builder::new(config).handler("default", common::noop()).start().await.expect("the service starts over TLS");
    let addr = service.local_addr().unwrap();
    let created = common::http(addr, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let admin = common::connect(&cluster.url("127.0.0.1", "jq", "sslmode=disable")).await;
    eventually(Duration::from_secs(30), "the job is done", || async {
        let done = count(&admin, &format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'done'")).await;
        (done == 1).then_some(())
    })
    .await;
    let plain = count(
        &admin,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.application_name LIKE 'jobqueue%' AND NOT s.ssl",
    )
    .await;
    let tls = count(
        &admin,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.application_name LIKE 'jobqueue%' AND s.ssl",
    )
    .await;
    assert_eq!(plain, 0, "every connection of the service is encrypted");
    assert!(tls >= 3, "pool, listener and engine connections are there ({tls})");
    service.stop().await.expect("stops cleanly");
}
