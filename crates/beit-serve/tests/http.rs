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

/// A body over the server's limit: the server answers 413 from the `Content-Length` header and
/// may close the connection before the client has written the whole body, in which case the
/// client sees a broken pipe instead of the answer. Either is the refusal; a 413 must carry a
/// JSON error.
fn post_too_large(url: &str, content_type: &str, body: &[u8]) {
    let sent = agent()
        .post(url)
        .header("Content-Type", content_type)
        .send(body);
    match sent {
        Ok(mut r) => {
            assert_eq!(r.status().as_u16(), 413);
            let resp = r.body_mut().read_to_vec().unwrap();
            assert!(!json(&resp)["error"].as_str().unwrap().is_empty());
        }
        Err(ureq::Error::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "too large body: {e}"
        ),
        Err(e) => panic!("too large body: {e}"),
    }
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
    post_too_large(&url, "image/png", &vec![0u8; 300_000]);
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

fn seg_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seg/segment")
}

const SEG_IMAGES: [&str; 5] = [
    "cat_gray.png",
    "chelsea.png",
    "rocket.jpg",
    "rocket_420.jpg",
    "rocket_rgba.png",
];

/// What `beit-cli segment --json` prints for `name`: the same library calls (checkpoint,
/// processor, decoder, whole-image inference, class areas).
fn cli_segmentation(name: &str) -> serde_json::Value {
    use beit_recipes::segment::{class_areas, segment_image, ImageSegmentation, Inference};
    let dir = seg_dir();
    let loaded = beit_recipes::load_model(dir.to_str().unwrap(), false).unwrap();
    let model =
        beit_model::segmentation::segmentation_model(&loaded.checkpoint, &Device::Cpu).unwrap();
    let path = dir.join(name);
    let img = beit_data::decode::decode_file(&path, &Default::default()).unwrap();
    let labels = segment_image(
        &model,
        &loaded.processor,
        &img,
        Inference::Whole,
        &Device::Cpu,
    )
    .unwrap();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let classes = class_areas(&labels, |i| loaded.checkpoint.config.label(i));
    serde_json::to_value(ImageSegmentation {
        image: name.into(),
        height: h,
        width: w,
        labels: labels.chunks(w).map(<[u32]>::to_vec).collect(),
        classes,
    })
    .unwrap()
}

fn assert_same_segmentation(got: &serde_json::Value, want: &serde_json::Value, name: &str) {
    for key in ["height", "width", "labels", "classes"] {
        assert_eq!(got[key], want[key], "{name}: {key}");
    }
}

fn post_accept(url: &str, accept: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut r = agent()
        .post(url)
        .header("Content-Type", "application/octet-stream")
        .header("Accept", accept)
        .send(body)
        .unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), ct, r.body_mut().read_to_vec().unwrap())
}

#[test]
fn segment_answers_the_cli_label_map_as_json_and_png() {
    let server = Running::start_with(
        seg_dir(),
        ServeConfig {
            max_batch: 4,
            max_wait: Duration::from_millis(20),
            ..ServeConfig::default()
        },
    );
    let url = server.url("/v1/segment");
    let want: Vec<serde_json::Value> = SEG_IMAGES.iter().map(|n| cli_segmentation(n)).collect();
    // Concurrent single-image requests (batched together) answer the CLI's label map.
    let clients: Vec<_> = SEG_IMAGES
        .iter()
        .zip(&want)
        .map(|(name, want)| {
            let (url, want) = (url.clone(), want.clone());
            let bytes = std::fs::read(seg_dir().join(name)).unwrap();
            std::thread::spawn(move || {
                let (status, body) = post(&url, "application/octet-stream", &bytes);
                assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
                let got = json(&body);
                assert_eq!(got[0]["image"], "body");
                assert_same_segmentation(&got[0], &want, name);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // Several images in one multipart request, named by their parts.
    let (a, b) = (SEG_IMAGES[1], SEG_IMAGES[2]);
    let (ba, bb) = (
        std::fs::read(seg_dir().join(a)).unwrap(),
        std::fs::read(seg_dir().join(b)).unwrap(),
    );
    let (ct, body) = multipart(&[(a, &ba), (b, &bb)]);
    let (status, resp) = post(&url, &ct, &body);
    assert_eq!(status, 200);
    let got = json(&resp);
    assert_eq!(got[0]["image"], a);
    assert_same_segmentation(&got[0], &want[1], a);
    assert_same_segmentation(&got[1], &want[2], b);
    // A label PNG on request, decoding to the same labels; one image per PNG answer.
    let (status, ct, png) = post_accept(&url, "image/png", &ba);
    assert_eq!((status, ct.as_str()), (200, "image/png"));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("labels.png");
    std::fs::write(&file, &png).unwrap();
    let map = beit_data::segmentation::read_label_png(&file).unwrap();
    assert_eq!((map.width, map.height), json_size(&want[1]));
    let labels: Vec<u64> = map.labels.iter().map(|&l| l as u64).collect();
    let want_labels: Vec<u64> = want[1]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .collect();
    assert_eq!(labels, want_labels);
    let (ct, body) = multipart(&[(a, &ba), (b, &bb)]);
    let r = agent()
        .post(&url)
        .header("Content-Type", &ct)
        .header("Accept", "image/png")
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // The other routes say this is a segmentation model.
    for route in ["/v1/classify", "/v1/embed"] {
        let (status, body) = post(&server.url(route), "image/png", &ba);
        assert_eq!(status, 404, "{route}");
        assert!(json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("/v1/segment"));
    }
    let (_, metrics) = get(&server.url("/metrics"));
    assert!(
        metrics.contains("beit_requests_total{route=\"/v1/segment\",status=\"200\"} 7"),
        "{metrics}"
    );
    server.shutdown();
}

fn json_size(want: &serde_json::Value) -> (u32, u32) {
    (
        want["width"].as_u64().unwrap() as u32,
        want["height"].as_u64().unwrap() as u32,
    )
}

#[test]
fn segment_refuses_hostile_bodies_and_classifiers() {
    let server = Running::start_with(
        seg_dir(),
        ServeConfig {
            max_body_bytes: 200_000,
            max_batch: 2,
            ..ServeConfig::default()
        },
    );
    let url = server.url("/v1/segment");
    let jpeg = std::fs::read(seg_dir().join("rocket.jpg")).unwrap();
    let png = std::fs::read(seg_dir().join("cat_gray.png")).unwrap();
    let hostile: Vec<(&str, Vec<u8>, u16)> = vec![
        ("empty", Vec::new(), 400),
        ("text", b"hello, not an image".to_vec(), 422),
        ("truncated jpeg", jpeg[..jpeg.len() / 2].to_vec(), 422),
        ("truncated png", png[..png.len() / 2].to_vec(), 422),
        ("pixel bomb", bmp_header(20_000, 20_000), 422),
    ];
    for (what, body, want) in &hostile {
        let (status, resp) = post(&url, "application/octet-stream", body);
        assert_eq!(status, *want, "{what}: {}", String::from_utf8_lossy(&resp));
        assert!(!json(&resp)["error"].as_str().unwrap().is_empty(), "{what}");
    }
    post_too_large(&url, "application/octet-stream", &vec![0u8; 300_000]);
    let many: Vec<(&str, &[u8])> = (0..3).map(|_| ("x.png", png.as_slice())).collect();
    let (ct, body) = multipart(&many);
    assert_eq!(post(&url, &ct, &body).0, 413);
    // Still healthy.
    let (status, body) = post(&url, "image/png", &png);
    assert_eq!(status, 200);
    assert_same_segmentation(&json(&body)[0], &cli_segmentation("cat_gray.png"), "cat");
    server.shutdown();
    // A classifier has no /v1/segment.
    let server = Running::start(ServeConfig::default());
    let (status, body) = post(&server.url("/v1/segment"), "image/png", &png);
    assert_eq!(status, 404);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("not a semantic segmentation model"));
    server.shutdown();
}
