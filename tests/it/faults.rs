//! The spool never stops the gateway: a full disk is survived and
//! recovered from without a restart, and a damaged spool file never keeps
//! the gateway from starting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

const TOKEN: &str = "faults-admin-token-42";

fn durable(url: &str) -> GatewayBuilder {
    GatewayBuilder::forward_all_to(url)
        .config(
            "[delivery]\nmode = \"durable\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\nmax_attempts = 100000\n\
             [server]\nbody_read_timeout = \"5s\"",
        )
        .admin_token(TOKEN)
}

/// A tmpfs of `size` mounted on `dir` for the test's life. Needs root, as
/// CI has; elsewhere the caller skips, loudly.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted && std::env::var_os("CI").is_some() {
            panic!("CI must be able to mount a tmpfs (it runs as root)");
        }
        mounted.then(|| Self(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A 1.5 KB webhook.
fn big_job(id: &str) -> Vec<u8> {
    let body = String::from_utf8(job(id, &[("ARMS_AMMO", "HIGH")])).unwrap();
    body.replacen(
        "\"width\":720",
        &format!("\"width\":720,\"pad\":\"{}\"", "x".repeat(1300)),
        1,
    )
    .into_bytes()
}

/// The spool on a 4 MiB tmpfs, the destination down, webhooks until the
/// disk is full: from then on every webhook gets 503 + Retry-After at once,
/// readiness and the metrics say the spool cannot write, and deliveries go
/// on from what is on disk. Once the disk grows the spool writes again by
/// itself, and nothing answered 202 is lost or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, to mount a small tmpfs; CI runs it"]
async fn a_full_disk_refuses_at_once_and_recovers_by_itself() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (dir, path) = durable(&format!("http://{addr}/hook")).write();
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("spool"), "4m") else {
        println!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let gw = TestGateway::launch(dir, path).await;

    // Fill the disk: 8 senders until each has seen a 503.
    let mut senders = Vec::new();
    for worker in 0..8 {
        let (client, url) = (gw.client.clone(), gw.url("/results"));
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0.. {
                let id = format!("fill-{worker}-{i}");
                let body = big_job(&id);
                let response = client
                    .post(&url)
                    .header("X-Hub-Signature-256", sign(&body))
                    .body(body)
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await
                    .expect("every webhook is answered");
                match response.status().as_u16() {
                    202 => accepted.push(id),
                    503 => return accepted,
                    other => panic!("{other}"),
                }
                assert!(i < 10_000, "a 4 MiB disk never filled");
            }
            unreachable!()
        }));
    }
    let mut accepted = Vec::new();
    for s in senders {
        accepted.extend(s.await.unwrap());
    }
    assert!(accepted.len() > 100, "{} accepted", accepted.len());

    // Full: every webhook is answered 503 + Retry-After, at once.
    for i in 0..20 {
        let started = std::time::Instant::now();
        let body = big_job(&format!("while-full-{i}"));
        let answered = tokio::time::timeout(Duration::from_secs(15), gw.post(&body, ""));
        let response = answered.await.expect("every webhook is answered");
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let ready = |gw: &TestGateway| {
        let (client, url) = (gw.client.clone(), format!("http://{}/readyz", gw.admin));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(ready(&gw).await, 503);
    let m = gw.metrics().await;
    assert_eq!(m.get("hookgate_spool_writable", ""), 0.0);
    assert!(m.get("hookgate_spool_errors_total", "op=\"commit\"") >= 1.0);
    assert_eq!(
        m.get("hookgate_queue_depth", "destination=\"down\""),
        accepted.len() as f64
    );

    // The destination comes back while the disk is still full: what is on
    // disk is delivered. Its circuit breaker opened while it was down, and
    // its cool-down (which doubles up to a minute) bounds the wait.
    let down = Downstream::start_on(addr, []).await;
    down.wait_for(accepted.len(), Duration::from_secs(90)).await;
    assert_eq!(gw.post(&big_job("still-full"), "").await.status(), 503);

    // Room again: the spool writes by itself, within seconds.
    tmpfs.resize("64m");
    let took = eventually(
        Duration::from_secs(10),
        "the spool writes again",
        || async { ready(&gw).await == 200 },
    )
    .await;
    println!(
        "{} accepted before the disk was full; writable again {took:?} after it grew",
        accepted.len()
    );
    assert_eq!(gw.metrics().await.get("hookgate_spool_writable", ""), 1.0);
    assert_eq!(gw.post(&big_job("after"), "").await.status(), 202);
    down.wait_for(accepted.len() + 1, Duration::from_secs(10))
        .await;

    // Everything delivered once, and the outcomes made while the disk was
    // full were saved: after a restart nothing is pending.
    let gw = gw.restart().await;
    let m = gw.metrics().await;
    assert_eq!(
        m.find("hookgate_queue_depth", "destination=\"down\"")
            .unwrap_or(0.0),
        0.0
    );
    let mut ids: Vec<String> = down
        .received()
        .iter()
        .map(|r| r.header("x-hookgate-job-id").unwrap().to_owned())
        .collect();
    let delivered: HashSet<String> = ids.iter().cloned().collect();
    assert!(accepted.iter().all(|id| delivered.contains(id)));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), down.received().len(), "no duplicates");
    gw.stop().await;
    drop(tmpfs);
}

/// How a spool file is damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncateHalf,
    TruncateToHeader,
    TruncateAnywhere,
    TruncateLastPage,
    FlipRun(usize),
    FlipScattered,
    ZeroAfterHeader,
    ZeroHeader,
    AppendGarbage(usize),
    Empty,
    AllGarbage,
    SwapPages,
    DuplicateFirstPage,
}

const DAMAGE: [Damage; 14] = [
    Damage::TruncateHalf,
    Damage::TruncateToHeader,
    Damage::TruncateAnywhere,
    Damage::TruncateLastPage,
    Damage::FlipRun(16),
    Damage::FlipRun(512),
    Damage::FlipScattered,
    Damage::ZeroAfterHeader,
    Damage::ZeroHeader,
    Damage::AppendGarbage(65_536),
    Damage::Empty,
    Damage::AllGarbage,
    Damage::SwapPages,
    Damage::DuplicateFirstPage,
];

impl Damage {
    fn apply(self, file: &mut Vec<u8>, rng: &mut fastrand::Rng) {
        const PAGE: usize = 4096;
        let len = file.len();
        match self {
            Damage::TruncateHalf => file.truncate(len / 2),
            Damage::TruncateToHeader => file.truncate(PAGE),
            Damage::TruncateAnywhere => file.truncate(rng.usize(1..len)),
            Damage::TruncateLastPage => file.truncate(len - PAGE),
            Damage::FlipRun(n) => {
                let at = rng.usize(0..len - n);
                file[at..at + n].iter_mut().for_each(|b| *b = !*b);
            }
            Damage::FlipScattered => {
                for _ in 0..8 {
                    let at = rng.usize(0..len);
                    file[at] ^= 1 << rng.u8(0..8);
                }
            }
            Damage::ZeroAfterHeader => file[PAGE..].fill(0),
            Damage::ZeroHeader => file[..512].fill(0),
            Damage::AppendGarbage(n) => file.extend((0..n).map(|_| rng.u8(..))),
            Damage::Empty => file.clear(),
            Damage::AllGarbage => file.iter_mut().for_each(|b| *b = rng.u8(..)),
            Damage::SwapPages => {
                let pages = len / PAGE;
                let (a, b) = (rng.usize(1..pages), rng.usize(1..pages));
                for i in 0..PAGE {
                    file.swap(a * PAGE + i, b * PAGE + i);
                }
            }
            Damage::DuplicateFirstPage => {
                let first = file[..PAGE].to_vec();
                let at = rng.usize(1..len / PAGE) * PAGE;
                file[at..at + PAGE].copy_from_slice(&first);
            }
        }
    }
}

/// A spool file holding `n` pending jobs for `url`, made by the real
/// gateway with its destination down and stopped cleanly.
async fn spool_with_pending(n: usize, url: &str) -> Vec<u8> {
    let (dir, path) = durable(url).write();
    let gw = BinaryGateway::spawn(dir.path(), &path, &[]).await;
    for i in 0..n {
        assert_eq!(
            gw.post(&job(&format!("intact-{i}"), &[])).await.status(),
            202
        );
    }
    let (code, _) = gw.stop().await;
    assert_eq!(code, Some(0));
    std::fs::read(dir.path().join("spool/spool.redb")).unwrap()
}

/// The JSON log line whose message is `message`.
fn log_line(log: &str, message: &str) -> Option<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
}

/// A spool of 300 pending jobs, damaged in 14 ways with two seeds each:
/// the gateway starts and is ready every time; a file the engine cannot
/// use is moved aside with an ERROR naming where; otherwise every job the
/// spool still holds is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_file_never_keeps_the_gateway_down() {
    const JOBS: usize = 300;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("http://{addr}/hook");
    let intact = spool_with_pending(JOBS, &url).await;
    let down = Downstream::start_on(addr, []).await;
    let mut kinds = (0, 0, 0);
    for (run, damage) in DAMAGE.iter().chain(DAMAGE.iter()).enumerate() {
        let seed = 0x5eed_0000 + run as u64;
        let mut file = intact.clone();
        damage.apply(&mut file, &mut fastrand::Rng::with_seed(seed));
        let before = down.received().len();
        let (dir, path) = durable(&url).write();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(spool.join("spool.redb"), &file).unwrap();
        // Ready, or the spawn panics.
        let gw = BinaryGateway::spawn(
            dir.path(),
            &path,
            &[("HOOKGATE_LOG__FORMAT", "json"), ("RUST_LOG", "info")],
        )
        .await;
        eventually(Duration::from_secs(5), "the spool is opened", || async {
            log_line(&gw.log(), "spool opened").is_some()
        })
        .await;
        let log = gw.log();
        let pending = log_line(&log, "spool opened").unwrap()["pending"]
            .as_u64()
            .unwrap() as usize;
        let moved = log_line(&log, "THE SPOOL FILE WAS DAMAGED");
        let aside: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
            .collect();
        let outcome = match &moved {
            Some(line) => {
                kinds.0 += 1;
                assert_eq!(aside.len(), 1, "run {run} ({damage:?})");
                let named = line["moved_to"].as_str().unwrap();
                assert!(named.ends_with(&*aside[0].file_name().to_string_lossy()));
                assert_eq!(pending, 0);
                "moved aside"
            }
            None if pending == JOBS => {
                kinds.1 += 1;
                "tolerated"
            }
            None => {
                kinds.2 += 1;
                assert!(
                    log_line(&log, "rolled back").is_some()
                        || log_line(&log, "quarantined").is_some(),
                    "run {run} ({damage:?}): {pending} of {JOBS} pending and nothing said why:\n{log}"
                );
                "repaired"
            }
        };
        let waiting = down.clone();
        let delivered = tokio::spawn(async move {
            waiting
                .wait_for(before + pending, Duration::from_secs(20))
                .await
        });
        let Ok(got) = delivered.await else {
            let log = gw.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "run {run} ({damage:?}): {} of {pending} delivered; log:\n{}",
                down.received().len() - before,
                tail.join("\n")
            );
        };
        let ids: HashSet<&str> = got[before..]
            .iter()
            .map(|r| r.header("x-hookgate-job-id").unwrap())
            .collect();
        assert!(
            ids.len() >= pending,
            "run {run}: every job it holds is delivered"
        );
        assert!(ids.iter().all(|id| id.starts_with("intact-")));
        assert_eq!(
            gw.post(&job(&format!("new-{run}"), &[])).await.status(),
            202
        );
        println!("run {run} ({damage:?}, seed {seed:#x}): {outcome}, {pending} delivered");
        let (code, _) = gw.stop().await;
        assert_eq!(code, Some(0));
    }
    println!(
        "{} moved aside, {} tolerated, {} repaired or partly quarantined",
        kinds.0, kinds.1, kinds.2
    );
}

/// Records that cannot be decoded are quarantined, not fatal: the rest of
/// the spool is delivered, a delivery whose job was quarantined becomes a
/// dead letter `undecodable`, and the quarantine is counted, logged with
/// its keys and listed by the admin API.
#[tokio::test]
async fn undecodable_records_are_quarantined_and_the_rest_delivered() {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
    const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");

    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("http://{addr}/hook");
    let file = spool_with_pending(10, &url).await;
    let (dir, path) = durable(&url).write();
    let spool = dir.path().join("spool/spool.redb");
    std::fs::create_dir_all(spool.parent().unwrap()).unwrap();
    std::fs::write(&spool, file).unwrap();
    let (broken_delivery, broken_job) = {
        let db = redb::Database::create(&spool).unwrap();
        let ids: Vec<(u64, serde_json::Value)> = {
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(DELIVERIES).unwrap();
            table
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.value(), serde_json::from_slice(v.value()).unwrap())
                })
                .collect()
        };
        let broken_job = ids[1].1["job"].as_u64().unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(DELIVERIES)
            .unwrap()
            .insert(ids[0].0, b"{\"job\": not json".as_slice())
            .unwrap();
        txn.open_table(JOBS)
            .unwrap()
            .insert(broken_job, [0xFFu8; 3].as_slice())
            .unwrap();
        txn.commit().unwrap();
        (ids[0].0, broken_job)
    };

    let down = Downstream::start_on(addr, []).await;
    let gw = BinaryGateway::spawn(dir.path(), &path, &[("HOOKGATE_LOG__FORMAT", "json")]).await;
    down.wait_for(8, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(5),
        "the dead letter is counted",
        || async {
            gw.metrics()
                .await
                .get("hookgate_dead_letters", "destination=\"down\"")
                == 1.0
        },
    )
    .await;
    let metrics = gw.metrics().await;
    assert_eq!(metrics.get("hookgate_spool_quarantined_records", ""), 2.0);
    let admin = |path: &str| {
        let request = gw
            .client
            .get(format!("http://{}{path}", gw.admin))
            .bearer_auth(TOKEN)
            .send();
        async move {
            request
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let listed = admin("/admin/quarantine").await;
    let mut found: Vec<(String, u64)> = listed["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["table"].as_str().unwrap().to_owned(),
                q["key"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("deliveries".to_owned(), broken_delivery),
            ("jobs".to_owned(), broken_job)
        ]
    );
    let dead = admin("/admin/dead-letters").await;
    let reason = dead["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("undecodable"), "{reason}");
    let log = gw.log();
    for key in [broken_delivery, broken_job] {
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["level"] == "ERROR" && v["key"] == key);
        assert!(line.is_some(), "no ERROR names key {key}:\n{log}");
    }
    assert_eq!(down.received().len(), 8);
    let (code, _) = gw.stop().await;
    assert_eq!(code, Some(0));
}
