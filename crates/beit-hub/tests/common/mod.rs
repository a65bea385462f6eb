//! Test helpers: a cache laid out exactly as `huggingface_hub` lays it out, and a small local HTTP
//! server that answers the three requests `hf-hub` makes (repository info, file metadata with
//! `Range: bytes=0-0`, ranged file download). The real `hf-hub` client talks to it over TCP; nothing
//! in `hf-hub` is replaced.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const COMMIT2: &str = "89abcdef0123456789abcdef0123456789abcdef";

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the contents: the hub's etag for LFS files (weights).
pub fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Git blob id: the hub's etag for regular git files (configs).
pub fn git_sha1(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

/// The etag the hub would give a file: LFS (sha256) for weights, git sha1 otherwise.
pub fn etag_for(name: &str, data: &[u8]) -> String {
    if name.ends_with(".safetensors") || name.ends_with(".bin") {
        sha256(data)
    } else {
        git_sha1(data)
    }
}

/// Write `files` into `cache` for `repo` at `commit` the way huggingface_hub does: contents in
/// `blobs/<etag>`, relative symlinks in `snapshots/<commit>/`, and `refs/<branch>` when given.
pub fn write_cached(
    cache: &Path,
    repo: &str,
    commit: &str,
    branch: Option<&str>,
    files: &[(&str, &[u8])],
) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = repo_dir.join("blobs");
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (name, data) in files {
        let etag = etag_for(name, data);
        std::fs::write(blobs.join(&etag), data).unwrap();
        let link = snap.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), &link).unwrap();
    }
    if let Some(branch) = branch {
        let r = repo_dir.join("refs").join(branch);
        std::fs::create_dir_all(r.parent().unwrap()).unwrap();
        std::fs::write(r, commit).unwrap();
    }
    repo_dir
}

/// A `config.json` resembling the hub's BEiT configs.
pub fn config_json() -> Vec<u8> {
    br#"{"architectures":["BeitForImageClassification"],"model_type":"beit","hidden_size":768,"image_size":224,"patch_size":16,"use_relative_position_bias":true}"#.to_vec()
}

/// Every regular file below `dir` (symlinks not followed), relative to `dir`.
pub fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A port on 127.0.0.1 with nothing listening.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// One file served by [`FakeHub`].
#[derive(Clone)]
pub struct Served {
    pub data: Vec<u8>,
    /// What the metadata response announces as etag (normally the right digest).
    pub etag: String,
    /// Bytes actually sent by a download before the connection is closed (`None`: all of them).
    pub cut_after: Option<usize>,
    /// Replace the body by this (same length) to simulate corruption in transit.
    pub body_override: Option<Vec<u8>>,
}

#[derive(Default)]
pub struct HubState {
    /// repo -> (commit, files)
    pub repos: HashMap<String, (String, Vec<(String, Served)>)>,
    /// HTTP status to answer for every request about a repo.
    pub status: HashMap<String, u16>,
    /// Request log: (method path, authorization header).
    pub log: Vec<(String, Option<String>)>,
}

/// A minimal stand-in for huggingface.co on a local port.
pub struct FakeHub {
    pub endpoint: String,
    pub state: Arc<Mutex<HubState>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &st);
                });
            }
        });
        FakeHub { endpoint, state }
    }

    pub fn add_repo(&self, repo: &str, commit: &str, files: &[(&str, Vec<u8>)]) {
        let files = files
            .iter()
            .map(|(n, d)| {
                (
                    n.to_string(),
                    Served {
                        data: d.clone(),
                        etag: etag_for(n, d),
                        cut_after: None,
                        body_override: None,
                    },
                )
            })
            .collect();
        self.state
            .lock()
            .unwrap()
            .repos
            .insert(repo.to_string(), (commit.to_string(), files));
    }

    pub fn edit_file(&self, repo: &str, name: &str, f: impl FnOnce(&mut Served)) {
        let mut st = self.state.lock().unwrap();
        let files = &mut st.repos.get_mut(repo).unwrap().1;
        f(&mut files.iter_mut().find(|(n, _)| n == name).unwrap().1);
    }

    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().log.clone()
    }
}

fn handle(stream: TcpStream, state: &Mutex<HubState>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        // A bare connection (beit-hub's reachability probe): nothing to answer.
        return Ok(());
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut out = stream;
    let mut st = state.lock().unwrap();
    st.log.push((
        format!("GET {target}"),
        headers.get("authorization").cloned(),
    ));
    let path = target.split('?').next().unwrap().to_string();

    // /api/models/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let repo = format!("{}/{}", parts[0], parts.get(1).unwrap_or(&""));
        if let Some(&status) = st.status.get(&repo) {
            return respond(&mut out, status, &[], b"{\"error\":\"nope\"}");
        }
        let Some((commit, files)) = st.repos.get(&repo) else {
            return respond(&mut out, 404, &[], b"{\"error\":\"Repository not found\"}");
        };
        let siblings: Vec<String> = files
            .iter()
            .map(|(n, _)| format!("{{\"rfilename\":\"{n}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{repo}\",\"sha\":\"{commit}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return respond(
            &mut out,
            200,
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let repo = format!("{}/{}", parts[0], parts[1]);
        if let Some(&status) = st.status.get(&repo) {
            return respond(&mut out, status, &[], b"");
        }
        let Some((commit, files)) = st.repos.get(&repo) else {
            return respond(&mut out, 404, &[], b"");
        };
        let commit = commit.clone();
        let Some((_, file)) = files.iter().find(|(n, _)| n == parts[4]) else {
            return respond(&mut out, 404, &[], b"");
        };
        let file = file.clone();
        drop(st);
        let size = file.data.len();
        let start: usize = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let end = headers
            .get("range")
            .and_then(|r| r.split('-').nth(1))
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(size.saturating_sub(1));
        let body = file.body_override.as_ref().unwrap_or(&file.data);
        let slice = &body[start.min(size)..(end + 1).min(size)];
        let mut hdrs = vec![
            ("X-Repo-Commit", commit),
            ("Content-Range", format!("bytes {start}-{end}/{size}")),
        ];
        if file.etag.len() == 64 {
            hdrs.push(("X-Linked-Etag", format!("\"{}\"", file.etag)));
            hdrs.push(("ETag", "\"W/irrelevant\"".into()));
        } else {
            hdrs.push(("ETag", format!("\"{}\"", file.etag)));
        }
        return match file.cut_after {
            // A transfer that dies half-way: announce everything, send part, hang up.
            Some(n) if slice.len() > 1 => {
                write_head(&mut out, 206, &hdrs, slice.len())?;
                out.write_all(&slice[..n.min(slice.len())])?;
                out.flush()?;
                out.shutdown(std::net::Shutdown::Both)
            }
            _ => respond(&mut out, 206, &hdrs, slice),
        };
    }
    respond(&mut out, 404, &[], b"")
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    len: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()?;
    // Drain anything left so the client sees an orderly close.
    let _ = out.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 64];
    let _ = out.read(&mut sink);
    Ok(())
}
