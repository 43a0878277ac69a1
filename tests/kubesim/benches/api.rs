//! Throughput and latency of the emulator itself, so figures measured through it can be read
//! against its own cost. Run: `cargo bench -p agenttask-kubesim --bench api`.
//! Prints objects/s for creates (sequential and concurrent) and the latency from sending a
//! create to receiving its watch event.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::{Client, Config};
use serde_json::json;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"bench": "yes"}}, "data": {"k": "v".repeat(100)}})).unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agenttask-kubesim"))
        .args(["--addr", "127.0.0.1:0", "--kubelet", "none"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start agenttask-kubesim");
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let config = Config::new(url.trim().parse().unwrap());
    let client = Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    let n = 2000;
    let t = Instant::now();
    for i in 0..n {
        cms.create(&pp, &cm(&format!("seq-{i}"))).await.unwrap();
    }
    let seq = n as f64 / t.elapsed().as_secs_f64();

    let concurrency = 16;
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let cms = cms.clone();
            let pp = pp.clone();
            async move { cms.create(&pp, &cm(&format!("par-{i}"))).await }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let par = n as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let listed = cms.list(&Default::default()).await.unwrap().items.len();
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;

    // Watch latency: from sending a create to its ADDED event on an open watch.
    let rv = cms
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut lat = vec![];
    for i in 0..500 {
        let name = format!("watch-{i}");
        let obj = cm(&name);
        let sent = Instant::now();
        let create = cms.create(&pp, &obj);
        let wait_event = async {
            while let Some(ev) = stream.try_next().await.unwrap() {
                if let WatchEvent::Added(o) = ev {
                    if o.metadata.name.as_deref() == Some(&name) {
                        return sent.elapsed();
                    }
                }
            }
            panic!("watch ended");
        };
        let (created, took) = tokio::join!(create, wait_event);
        created.unwrap();
        lat.push(took);
    }
    lat.sort();
    println!("agenttask-kubesim benchmark (kube-rs client over loopback HTTP/1.1)");
    println!("create, sequential:            {seq:>8.0} objects/s ({n} ConfigMaps)");
    println!("create, {concurrency} concurrent:         {par:>8.0} objects/s ({n} ConfigMaps)");
    println!("list of {listed} ConfigMaps:       {list_ms:>8.1} ms");
    println!(
        "create -> watch event latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (500 events)",
        pct(&lat, 0.5).as_secs_f64() * 1000.0,
        pct(&lat, 0.99).as_secs_f64() * 1000.0,
        lat.last().unwrap().as_secs_f64() * 1000.0
    );
    let _ = child.kill();
    let _ = child.wait();
}
