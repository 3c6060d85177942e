//! The web page on the running agent: headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol) types a query into the real `run` binary's page, and the thumbnail
//! routes are checked against what they must refuse, re-render and keep on disk.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use headless_chrome::protocol::cdp::Emulation;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

use docusearch_agent::config::Config;
use docusearch_agent::types::DocId;

use crate::common::{
    self, corpus, free_port, pdf_pages, rig, wait_until, write_file, Rig, RunningAgent,
};

/// `run` with the status API on a free port.
struct Running {
    agent: RunningAgent,
    port: u16,
    log: PathBuf,
}

fn start(rig: &Rig, cfg: &Config) -> Running {
    let mut cfg = cfg.clone();
    cfg.api.port = free_port();
    let config = rig.cfg.state_dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&cfg).expect("config as TOML")).expect("write config");
    let log = rig.cfg.state_dir.join("agent.log");
    let agent = RunningAgent::start(&config, std::slice::from_ref(&rig.root), &log);
    let running = Running {
        agent,
        port: cfg.api.port,
        log,
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", running.port)).is_ok()
                && running.get("/status").0 == 200
        }),
        "the agent's API never answered; log:\n{}",
        running.log_text()
    );
    running
}

impl Running {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A raw `GET` (no client normalising the path), with `Host: 127.0.0.1:PORT` unless given.
    fn get_with_host(&self, path: &str, host: &str) -> (u16, Vec<u8>) {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: {host}"), "")
    }

    /// `POST /api/open` as the page sends it, from `origin`.
    fn open(&self, body: &str, origin: &str) -> u16 {
        let head = format!(
            "POST /api/open HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {origin}\r\nContent-Type: application/json",
            self.port
        );
        self.request(&head, body).0
    }

    fn request(&self, head: &str, body: &str) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        write!(
            s,
            "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP answer");
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        let mut body = raw[end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.get_with_host(path, &format!("127.0.0.1:{}", self.port))
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200);
        serde_json::from_slice(&body).expect("status JSON")
    }

    fn wait_indexed(&self, files: u64) {
        let ok = wait_until(Duration::from_secs(180), || {
            let s = self.status();
            s["indexed"]["files"] == files
                && s["queue"]["queued"] == 0
                && s["queue"]["in_progress"] == 0
        });
        assert!(
            ok,
            "{files} files were not indexed; log:\n{}",
            self.log_text()
        );
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Debian's chromium (or `CHROMIUM`), which `scripts/setup` installs.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("chromium");
        if p.is_file() {
            return p;
        }
    }
    panic!("prerequisite missing for this test: chromium. Run `scripts/setup` (as root it installs Debian's chromium), or `apt-get install chromium`, or set CHROMIUM=/path/to/chrome");
}

fn browser() -> Browser {
    let options = LaunchOptions::default_builder()
        .path(Some(chromium()))
        .headless(true)
        // As root (CI), Chromium's sandbox cannot start.
        .sandbox(false)
        .window_size(Some((1440, 1000)))
        .idle_browser_timeout(Duration::from_secs(600))
        .build()
        .expect("launch options");
    Browser::new(options).expect("headless chromium starts")
}

/// Evaluates `js` (an expression whose value is JSON-able) in the page.
fn eval(tab: &Tab, js: &str) -> serde_json::Value {
    let wrapped = format!("JSON.stringify((() => {{ return {js}; }})())");
    let v = tab.evaluate(&wrapped, false).expect("evaluate in the page");
    let text = v
        .value
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

fn wait_for(tab: &Tab, what: &str, js: &str) -> serde_json::Value {
    for _ in 0..600 {
        let v = eval(tab, js);
        if !(v.is_null() || v == false) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting in the page for: {what}");
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact folder");
    dir
}

fn screenshot(tab: &Tab, name: &str) -> PathBuf {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let path = artifacts().join(name);
    std::fs::write(&path, png).expect("save the screenshot");
    path
}

#[test]
fn the_search_page_in_chromium_shows_page_thumbnails_and_a_live_status_panel() {
    let rig = rig(200);
    for name in ["asyRefCard.pdf", "xfig-howto.pdf"] {
        std::fs::copy(corpus().join(name), rig.root.join(name)).expect("copy a corpus file");
    }
    let agent = start(&rig, &rig.cfg);
    agent.wait_indexed(2);
    let before = agent.status();

    let browser = browser();
    let tab = browser.new_tab().expect("a tab");
    tab.navigate_to(&format!("http://127.0.0.1:{}/", agent.port))
        .expect("open the page")
        .wait_until_navigated()
        .expect("page loads");

    // The status panel, from the event stream: the same numbers as /status.
    wait_for(
        &tab,
        "the panel's file count",
        "document.getElementById('st-files').textContent === '2'",
    );
    let shown = eval(
        &tab,
        "['st-files','st-pages','st-chunks','st-queued'].map(id => document.getElementById(id).textContent)",
    );
    let fmt = |v: &serde_json::Value| v.as_u64().expect("a count").to_string();
    assert_eq!(
        shown,
        serde_json::json!([
            fmt(&before["indexed"]["files"]),
            fmt(&before["indexed"]["pages"]),
            fmt(&before["indexed"]["chunks"]),
            "0"
        ]),
        "the panel shows what /status says"
    );
    let model = eval(&tab, "document.getElementById('st-model').textContent");
    assert!(
        model.as_str().is_some_and(|m| m.contains("tiny-colpali")),
        "model line: {model}"
    );
    wait_for(
        &tab,
        "Chroma reachable",
        "document.getElementById('st-chroma').textContent.includes('reachable')",
    );

    // A query typed and sent with Enter: cards with thumbnails that really loaded.
    tab.wait_for_element("#q")
        .expect("search box")
        .click()
        .expect("focus");
    tab.type_str("reference card").expect("type");
    tab.press_key("Enter").expect("Enter");
    let cards = wait_for(
        &tab,
        "results",
        "document.querySelectorAll('.card').length || null",
    );
    assert!(cards.as_u64().unwrap_or(0) > 0);
    let loaded = wait_for(
        &tab,
        "the visible thumbnails to load",
        "(() => { const imgs = [...document.querySelectorAll('.card img')].filter(i => i.getBoundingClientRect().top < innerHeight); \
           return imgs.length > 0 && imgs.every(i => i.complete) ? imgs.map(i => [i.naturalWidth, i.naturalHeight]) : null })()",
    );
    let sizes = loaded.as_array().expect("sizes");
    assert!(
        sizes
            .iter()
            .all(|s| s[0].as_u64() > Some(0) && s[1].as_u64() > Some(0)),
        "every visible thumbnail decoded to a real image: {sizes:?}"
    );
    let first = eval(
        &tab,
        "(() => { const c = document.querySelector('.card'); return [c.querySelector('.name').textContent, c.querySelector('.line').textContent, document.activeElement === c] })()",
    );
    assert!(
        first[0].as_str().is_some_and(|n| n.ends_with(".pdf"))
            && first[1].as_str().is_some_and(|l| l.contains("page ")),
        "a card names its file and page: {first}"
    );
    assert_eq!(
        first[2], true,
        "the first result has the focus, for the arrow keys"
    );
    tab.press_key("ArrowRight").expect("arrow");
    let moved = eval(
        &tab,
        "[...document.querySelectorAll('.card')].indexOf(document.activeElement)",
    );
    if cards.as_u64() > Some(1) {
        assert_eq!(moved, 1, "the right arrow moves to the next result");
    }

    // The page's JSON is `search --json`'s: same keys, same hits.
    let (code, body) = agent.get("/api/search?q=reference%20card&limit=5&mode=visual");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let api: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let config = rig.cfg.state_dir.join("config.toml");
    let out = std::process::Command::new(common::agent_exe())
        .arg("--config")
        .arg(&config)
        .args([
            "search",
            "reference card",
            "--limit",
            "5",
            "--mode",
            "visual",
            "--json",
        ])
        .output()
        .expect("search runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).expect("search --json");
    let keys = |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&api), keys(&cli));
    assert_eq!(keys(&api["results"]), keys(&cli["results"]));
    let ids = |v: &serde_json::Value| {
        v["results"]["hits"]
            .as_array()
            .expect("hits")
            .iter()
            .map(|h| h["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&api),
        ids(&cli),
        "the same query finds the same records"
    );
    assert_eq!(api["mode"], "visual");

    // A file dropped in: the panel's counts change by themselves.
    write_file(&rig.root.join("dropped.pdf"), &pdf_pages("dropped", 0, 2));
    wait_for(
        &tab,
        "the panel to count the new file",
        "document.getElementById('st-files').textContent === '3'",
    );
    agent.wait_indexed(3);
    let after = agent.status();
    let pages = fmt(&after["indexed"]["pages"]);
    wait_for(
        &tab,
        "the panel's page count",
        &format!("document.getElementById('st-pages').textContent === '{pages}'"),
    );
    assert!(after["indexed"]["pages"].as_u64() > before["indexed"]["pages"].as_u64());

    let light = screenshot(&tab, "search-page.png");
    tab.call_method(Emulation::SetEmulatedMedia {
        media: None,
        features: Some(vec![Emulation::MediaFeature {
            name: "prefers-color-scheme".into(),
            value: "dark".into(),
        }]),
    })
    .expect("dark mode");
    let bg = eval(&tab, "getComputedStyle(document.body).backgroundColor");
    assert_eq!(bg, "rgb(21, 24, 29)", "dark mode has its own colours");
    let dark = screenshot(&tab, "search-page-dark.png");
    for p in [light, dark] {
        let img = image::open(&p).expect("the screenshot is a PNG");
        assert!(
            img.width() >= 1000 && img.height() >= 600,
            "{}",
            p.display()
        );
    }

    // An open page does not hold the agent up: SIGTERM ends its event stream and the agent
    // exits 0 (the wait fails the test if it does not exit).
    agent.agent.signal(libc::SIGTERM);
    let Running {
        agent: running,
        log,
        ..
    } = agent;
    let status = running.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success() && !text.contains("did not finish in time"),
        "run stops promptly and exits 0 after SIGTERM with a page open: {status:?}; log:\n{text}"
    );
}

/// The doc id of a path the agent never indexed.
fn doc_id_of(cfg: &Config, path: &Path) -> String {
    DocId::new(&cfg.agent_id, path).as_str().to_string()
}

fn cached(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                .map(|e| {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), size)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn thumbnails_are_refused_for_what_is_not_indexed_re_rendered_on_change_and_kept_under_the_cap() {
    let rig = rig(200);
    let mut cfg = rig.cfg.clone();
    cfg.api.thumbnail_cache_mb = 1;
    cfg.watch.exclude = vec!["private/**".into()];
    std::fs::copy(corpus().join("R-intro.pdf"), rig.root.join("R-intro.pdf")).expect("copy");
    write_file(
        &rig.root.join("edit.pdf"),
        &pdf_pages("first version", 0, 1),
    );
    // Never indexed: excluded inside the folder, and outside it.
    write_file(
        &rig.root.join("private/secret.pdf"),
        &pdf_pages("secret", 0, 0),
    );
    let outside = rig.cfg.state_dir.join("outside.pdf");
    write_file(&outside, &pdf_pages("outside", 0, 0));
    let agent = start(&rig, &cfg);
    agent.wait_indexed(2);
    let thumbs = cfg.thumbnail_dir();
    let png = |path: &str| {
        let (code, body) = agent.get(path);
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let img =
            image::load_from_memory_with_format(&body, image::ImageFormat::Png).expect("a PNG");
        assert!(img.width() > 0 && img.height() > 0);
        body
    };

    // Refused, with nothing rendered: not in the index, out of range, not an id at all.
    let edit = rig.doc_id("edit.pdf");
    let refused = [
        format!(
            "/api/thumbnail/{}/1",
            doc_id_of(&cfg, &rig.root.join("private/secret.pdf"))
        ),
        format!("/api/thumbnail/{}/1", doc_id_of(&cfg, &outside)),
        format!("/api/thumbnail/{}/0", edit.as_str()),
        format!("/api/thumbnail/{}/3", edit.as_str()),
        "/api/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd/1".to_string(),
        "/api/thumbnail/%2e%2e/1".to_string(),
        "/api/thumbnail/../../../etc/passwd".to_string(),
        format!("/api/thumbnail/{}/1", outside.display()),
        format!("/api/document/{}", doc_id_of(&cfg, &outside)),
        "/api/document/..%2Fstate.sled".to_string(),
    ];
    for path in &refused {
        let (code, body) = agent.get(path);
        assert!(
            (400..500).contains(&code),
            "{path} answered {code}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(
        cached(&thumbs).is_empty(),
        "nothing was rendered for them: {:?}",
        cached(&thumbs)
    );
    // Opening on the desktop: only an indexed document, only from the page's own origin.
    let own = format!("http://127.0.0.1:{}", agent.port);
    let outside_id = doc_id_of(&cfg, &outside);
    assert_eq!(
        agent.open(&format!(r#"{{"doc_id":"{outside_id}"}}"#), &own),
        404
    );
    assert_eq!(agent.open(r#"{"doc_id":"../../etc/passwd"}"#, &own), 400);
    let edit_body = format!(r#"{{"doc_id":"{}","reveal":true}}"#, edit.as_str());
    assert_eq!(agent.open(&edit_body, "http://evil.example"), 403);
    // A foreign Host is refused for the page as for the rest of the API.
    assert_eq!(agent.get_with_host("/", "evil.example").0, 421);
    assert_eq!(
        agent
            .get_with_host(
                &format!("/api/thumbnail/{}/1", edit.as_str()),
                &format!("evil.example:{}", agent.port)
            )
            .0,
        421
    );
    let (code, page) = agent.get("/");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&page).contains("<script src=\"app.js\""));

    // Rendered and cached under the content's hash; a changed file gets a new image.
    let first = png(&format!("/api/thumbnail/{}/1", edit.as_str()));
    let name_of = |prefix: &str| -> Vec<String> {
        cached(&thumbs)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(prefix))
            .collect()
    };
    let prefix = format!("{}-00001-", edit.as_str());
    let before = name_of(&prefix);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(
        png(&format!("/api/thumbnail/{}/1", edit.as_str())),
        first,
        "served from the cache"
    );
    // The same page, other content: a different picture (far more text on it).
    let long: Vec<String> = (0..2)
        .map(|i| format!("second version {i} ").repeat(40))
        .collect();
    let mut bytes = common::make_pdf(&long);
    bytes.extend_from_slice(b"\n% edited\n");
    write_file(&rig.root.join("edit.pdf"), &bytes);
    let changed = wait_until(Duration::from_secs(120), || {
        let now = name_of(&prefix);
        let (code, body) = agent.get(&format!("/api/thumbnail/{}/1", edit.as_str()));
        code == 200 && body != first && now.len() == 1 && now != before
    });
    assert!(
        changed,
        "the changed file's thumbnail was rendered again under its new hash: {:?}",
        name_of(&prefix)
    );
    // (Swap the file for a symbolic link leading out of the folder: refused.)
    std::fs::remove_file(rig.root.join("edit.pdf")).expect("rm");
    std::os::unix::fs::symlink(&outside, rig.root.join("edit.pdf")).expect("symlink");
    let (code, _) = agent.get(&format!("/api/thumbnail/{}/1", edit.as_str()));
    assert!(
        (400..500).contains(&code),
        "a symlink out of the folder is refused, not followed: {code}"
    );
    let (code, _) = agent.get(&format!("/api/document/{}", edit.as_str()));
    assert!((400..500).contains(&code), "the document too: {code}");

    // Many pages: the folder stays under its 1 MiB cap, the least recently used going first.
    let r = rig.doc_id("R-intro.pdf");
    let mut served = 0u64;
    for page in 1..=40u32 {
        served += png(&format!("/api/thumbnail/{}/{page}", r.as_str())).len() as u64;
        let total: u64 = cached(&thumbs).iter().map(|(_, s)| s).sum();
        assert!(
            total <= 1024 * 1024,
            "the cache holds {total} bytes after page {page}"
        );
    }
    let files = cached(&thumbs);
    assert!(
        served > 1024 * 1024,
        "the pages served ({served} bytes) are more than the cap"
    );
    assert!(
        !files.is_empty() && files.len() < 40,
        "{} files kept",
        files.len()
    );
    let newest = format!("{}-00040-", r.as_str());
    assert!(
        files.iter().any(|(n, _)| n.starts_with(&newest)),
        "the last page rendered is kept"
    );
    let oldest = format!("{}-00001-", r.as_str());
    assert!(
        !files.iter().any(|(n, _)| n.starts_with(&oldest)),
        "the least recently used went first"
    );
    // The document route serves the indexed file itself (for the browser's PDF viewer).
    let (code, body) = agent.get(&format!("/api/document/{}", r.as_str()));
    assert_eq!(code, 200);
    assert_eq!(
        body,
        std::fs::read(corpus().join("R-intro.pdf")).expect("read")
    );
}
