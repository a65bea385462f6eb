//! The server end to end over real HTTP on 127.0.0.1: every route, batching under concurrency,
//! hostile bodies, overload and the request limits, with the small classifier of
//! `fixtures/model/predict`.

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use beit_serve::{ServeConfig, Service};
use candle::Device;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/model/predict")
}

/// A server on a free loopback port; dropping `stop` shuts it down.
struct Running {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(cfg: ServeConfig) -> Running {
        Self::start_with(model_dir(), cfg)
    }

    fn start_with(dir: PathBuf, cfg: ServeConfig) -> Running {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let service = Service::load(dir.to_str().unwrap(), false, Device::Cpu, cfg).unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                service.serve(listener, shutdown).await.unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let r = Running {
            base: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&self) {
        for _ in 0..600 {
            if get(&format!("{}/readyz", self.base)).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server not ready within 30 s");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn agent() -> ureq::Agent {
    let cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build();
    ureq::Agent::new_with_config(cfg)
}

fn get(url: &str) -> (u16, String) {
    match agent().get(url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
        Err(_) => (0, String::new()),
    }
}

fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut r = agent()
        .post(url)
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_vec().unwrap())
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(model_dir().join(name)).unwrap()
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "beitserveboundary7d1f";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The expected probabilities of `expected.json` (transformers' pipeline, which
/// `beit-cli predict` matches within 1e-6) for `name`.
fn expected(name: &str) -> serde_json::Value {
    let all = json(&std::fs::read(model_dir().join("expected.json")).unwrap());
    all.as_array()
        .unwrap()
        .iter()
        .find(|e| e["image"] == name)
        .unwrap()
        .clone()
}

fn assert_matches_expected(got: &serde_json::Value, name: &str, k: usize) {
    let e = expected(name);
    let preds = got["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), k);
    assert_eq!(preds[0]["index"], e["top"][0], "{name}: top-1");
    for p in preds {
        let i = p["index"].as_u64().unwrap() as usize;
        let want = e["probabilities"][i].as_f64().unwrap();
        let diff = (p["probability"].as_f64().unwrap() - want).abs();
        assert!(diff < 1e-6, "{name}: class {i} off by {diff}");
    }
}

const IMAGES: [&str; 4] = [
    "cat_gray.png",
    "cat_small.jpg",
    "rocket.jpg",
    "rocket_rgba.png",
];

#[test]
fn routes_answer_and_batches_form_under_concurrency() {
    let server = Running::start(ServeConfig {
        max_batch: 8,
        max_wait: Duration::from_millis(20),
        ..ServeConfig::default()
    });
    assert_eq!(get(&server.url("/healthz")).0, 200);
    assert_eq!(get(&server.url("/readyz")).0, 200);
    assert_eq!(get(&server.url("/nope")).0, 404);

    // A raw body and a multipart request of all four images.
    let (status, body) = post(
        &server.url("/v1/classify?top_k=3"),
        "image/png",
        &image("cat_gray.png"),
    );
    assert_eq!(status, 200);
    let got = json(&body);
    assert_eq!(got[0]["image"], "body");
    assert_matches_expected(&got[0], "cat_gray.png", 3);
    let parts: Vec<(&str, Vec<u8>)> = IMAGES.iter().map(|n| (*n, image(n))).collect();
    let refs: Vec<(&str, &[u8])> = parts.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let (ct, body) = multipart(&refs);
    let (status, resp) = post(&server.url("/v1/classify"), &ct, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let got = json(&resp);
    for (i, name) in IMAGES.iter().enumerate() {
        assert_eq!(got[i]["image"], *name);
        assert_matches_expected(&got[i], name, 5);
    }

    // 24 clients at once, three requests each: every answer right, whatever batch it joined.
    let url = server.url("/v1/classify?top_k=5");
    let clients: Vec<_> = (0..24)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                for r in 0..3 {
                    let name = IMAGES[(c + r) % IMAGES.len()];
                    let (status, body) = post(&url, "application/octet-stream", &image(name));
                    assert_eq!(status, 200);
                    assert_matches_expected(&json(&body)[0], name, 5);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let (_, metrics) = get(&server.url("/metrics"));
    assert!(
        metrics.contains("beit_requests_total{route=\"/v1/classify\",status=\"200\"} 74"),
        "{metrics}"
    );
    let single = metric(&metrics, "beit_batch_size_bucket{le=\"1\"}");
    let batches = metric(&metrics, "beit_batch_size_count");
    println!("forward passes: {batches}, of one image: {single}");
    assert!(
        batches > single,
        "no batch of more than one image:\n{metrics}"
    );
    assert!(metrics.contains("beit_queue_depth 0"));
    assert!(metrics
        .contains("beit_request_duration_seconds_bucket{route=\"/v1/classify\",le=\"+Inf\"} 74"));
    server.shutdown();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn embed_answers_json_and_safetensors() {
    let server = Running::start(ServeConfig::default());
    let img = image("rocket.jpg");
    let (status, body) = post(
        &server.url("/v1/embed?pool=cls&layer=1"),
        "image/jpeg",
        &img,
    );
    assert_eq!(status, 200);
    let got = json(&body);
    assert_eq!(got["pool"], "cls");
    assert_eq!(got["layer"], 1);
    assert_eq!(got["dim"], 32);
    let cls: Vec<f32> = serde_json::from_value(got["embeddings"][0]["embedding"].clone()).unwrap();
    assert_eq!(cls.len(), 32);

    // Default: mean pooling of the last block; the same numbers as JSON and as safetensors.
    let (_, body) = post(&server.url("/v1/embed"), "image/jpeg", &img);
    let got = json(&body);
    assert_eq!(got["layer"], 2);
    let mean: Vec<f32> = serde_json::from_value(got["embeddings"][0]["embedding"].clone()).unwrap();
    assert_ne!(mean, cls);
    let mut r = agent()
        .post(&server.url("/v1/embed"))
        .header("Accept", "application/vnd.safetensors")
        .send(&img[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let bytes = r.body_mut().read_to_vec().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("embeddings").unwrap();
    assert_eq!(t.shape(), &[1, 32]);
    let vals: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, mean);

    for (query, what) in [
        ("pool=max", "pooling"),
        ("layer=3", "layer"),
        ("layer=x", "layer"),
    ] {
        let (status, body) = post(
            &server.url(&format!("/v1/embed?{query}")),
            "image/jpeg",
            &img,
        );
        assert_eq!(status, 400, "{query}");
        assert!(
            json(&body)["error"].as_str().unwrap().contains(what),
            "{query}"
        );
    }
    server.shutdown();
}

fn bmp_header(width: i32, height: i32) -> Vec<u8> {
    let mut b = b"BM".to_vec();
    for v in [54u32, 0, 54, 40] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&width.to_le_bytes());
    b.extend_from_slice(&height.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0u8; 24]);
    b
}

#[test]
fn hostile_bodies_fail_alone_with_a_json_message() {
    let server = Running::start(ServeConfig {
        max_body_bytes: 200_000,
        max_batch: 4,
        max_wait: Duration::from_millis(50),
        ..ServeConfig::default()
    });
    let jpeg = image("rocket.jpg");
    let png = image("cat_gray.png");
    // A BMP header claiming 20000 x 20000 pixels and no pixel data: refused from its header,
    // before any allocation.
    let bomb = bmp_header(20_000, 20_000);
    // A PNG whose header chunk no longer matches its checksum.
    let mut corrupt = png.clone();
    corrupt[16..20].copy_from_slice(&77u32.to_be_bytes());
    let hostile: Vec<(&str, Vec<u8>, u16)> = vec![
        ("empty", Vec::new(), 400),
        ("text", b"hello, not an image".to_vec(), 422),
        ("truncated jpeg", jpeg[..jpeg.len() / 2].to_vec(), 422),
        ("truncated png", png[..png.len() / 2].to_vec(), 422),
        ("corrupt png", corrupt, 422),
        ("pixel bomb", bomb, 422),
        ("too large", vec![0u8; 300_000], 413),
    ];
    // Good requests run alongside the hostile ones and still get their right answer.
    let url = server.url("/v1/classify?top_k=2");
    let good: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let (status, body) = post(&url, "image/png", &image("cat_gray.png"));
                assert_eq!(status, 200);
                assert_matches_expected(&json(&body)[0], "cat_gray.png", 2);
            })
        })
        .collect();
    for (what, body, want) in &hostile {
        let (status, resp) = post(&url, "application/octet-stream", body);
        assert_eq!(status, *want, "{what}: {}", String::from_utf8_lossy(&resp));
        let msg = json(&resp)["error"].as_str().unwrap().to_string();
        assert!(!msg.is_empty(), "{what}");
        println!("{what}: {status} {msg}");
    }
    for g in good {
        g.join().unwrap();
    }
    // Multipart: an empty part, too many images, a bad top_k.
    let (ct, body) = multipart(&[("a.png", &png), ("b.png", &[])]);
    assert_eq!(post(&url, &ct, &body).0, 400);
    let many: Vec<(&str, &[u8])> = (0..5).map(|_| ("x.png", png.as_slice())).collect();
    let (ct, body) = multipart(&many);
    assert_eq!(post(&url, &ct, &body).0, 413);
    let (ct, _) = multipart(&[]);
    assert_eq!(post(&url, &ct, b"garbage").0, 400);
    assert_eq!(
        post(&server.url("/v1/classify?top_k=0"), "image/png", &png).0,
        400
    );
    // The server is still healthy and answers correctly.
    let (status, body) = post(&url, "image/png", &png);
    assert_eq!(status, 200);
    assert_matches_expected(&json(&body)[0], "cat_gray.png", 2);
    server.shutdown();
}

/// The fixture classifier fed 384x384 images (2304 tokens instead of 16: position tables are
/// resampled), so that one forward pass takes long enough for a queue to fill.
fn slow_model_dir(tmp: &tempfile::TempDir) -> PathBuf {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir().join(f), tmp.path().join(f)).unwrap();
    }
    let mut pre = json(&std::fs::read(model_dir().join("preprocessor_config.json")).unwrap());
    pre["size"] = serde_json::json!({"height": 384, "width": 384});
    std::fs::write(tmp.path().join("preprocessor_config.json"), pre.to_string()).unwrap();
    tmp.path().to_path_buf()
}

#[test]
fn a_slow_answer_is_a_504() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Running::start_with(
        slow_model_dir(&tmp),
        ServeConfig {
            request_timeout: Duration::from_millis(1),
            ..ServeConfig::default()
        },
    );
    let (status, body) = post(
        &server.url("/v1/classify"),
        "image/jpeg",
        &image("rocket.jpg"),
    );
    assert_eq!(status, 504);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("within 1 ms"));
    server.shutdown();
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    // A queue of one and batches of one: a burst of concurrent clients overflows it.
    let tmp = tempfile::tempdir().unwrap();
    let server = Running::start_with(
        slow_model_dir(&tmp),
        ServeConfig {
            max_batch: 1,
            queue_capacity: 1,
            ..ServeConfig::default()
        },
    );
    let url = server.url("/v1/classify");
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = agent()
                    .post(&url)
                    .send(&std::fs::read(model_dir().join("rocket.jpg")).unwrap()[..])
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    println!("{ok} answered, {} refused", busy.len());
    assert_eq!(ok + busy.len(), results.len(), "{results:?}");
    assert!(ok >= 1);
    assert!(
        !busy.is_empty(),
        "no 503 from a queue of one under 32 clients"
    );
    assert!(busy.iter().all(|r| r.1.as_deref() == Some("1")));
    server.shutdown();
}
