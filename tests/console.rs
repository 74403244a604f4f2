//! The web console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (Debian's chromedriver, spoken to in plain HTTP and JSON) against a real daemon. The
//! page loads from the daemon alone, signs in with a token, shows the tier's K instances
//! by state, a scale through the page changes the grid, a read-only token gets no scale
//! control, and a screenshot is saved.

use crate::support::{admin_token, root, web_site};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver on a loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Driver {
    fn start() -> Driver {
        let port = crate::bmc::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's chromedriver (cargo xtask setup installs chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("{url}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, url }
    }

    fn session(&self, profile: &std::path::Path) -> Session<'_> {
        // The flags a root, offline machine needs: no sandbox (root), no GPU, and nothing
        // reaching for Google's services.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let v = post(
            &format!("{}/session", self.url),
            json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}}),
        );
        Session {
            driver: self,
            id: v["sessionId"].as_str().expect("a session").to_string(),
        }
    }
}

fn post(url: &str, body: Value) -> Value {
    match ureq::post(url)
        .timeout(Duration::from_secs(60))
        .send_json(body)
    {
        Ok(r) => r.into_json::<Value>().unwrap()["value"].clone(),
        Err(ureq::Error::Status(code, r)) => {
            panic!(
                "WebDriver {url}: {code} {}",
                r.into_string().unwrap_or_default()
            )
        }
        Err(e) => panic!("WebDriver {url}: {e}"),
    }
}

impl Session<'_> {
    fn at(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.driver.url, self.id)
    }
    fn go(&self, url: &str) {
        post(&self.at("/url"), json!({ "url": url }));
    }
    /// The elements matching a CSS selector now.
    fn all(&self, css: &str) -> Vec<String> {
        post(
            &self.at("/elements"),
            json!({"using": "css selector", "value": css}),
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[ELEMENT].as_str().unwrap().to_string())
        .collect()
    }
    /// Waits (bounded) until `css` matches exactly `n` elements.
    fn wait_count(&self, css: &str, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.all(css).len();
            if found == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{css}` matched {found}, not {n}, within {limit:?}; the page says: {}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    fn one(&self, css: &str) -> String {
        let all = self.all(css);
        assert_eq!(all.len(), 1, "`{css}` matches one element");
        all[0].clone()
    }
    fn text(&self, css: &str) -> String {
        let e = self.one(css);
        ureq::get(&self.at(&format!("/element/{e}/text")))
            .call()
            .unwrap()
            .into_json::<Value>()
            .unwrap()["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    fn type_into(&self, css: &str, text: &str) {
        let e = self.one(css);
        post(&self.at(&format!("/element/{e}/clear")), json!({}));
        post(
            &self.at(&format!("/element/{e}/value")),
            json!({ "text": text }),
        );
    }
    fn click(&self, css: &str) {
        let e = self.one(css);
        post(&self.at(&format!("/element/{e}/click")), json!({}));
    }
    fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = ureq::get(&self.at("/screenshot"))
            .call()
            .unwrap()
            .into_json::<Value>()
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.driver.url, self.id)).call();
    }
}

#[test]
fn the_console_shows_the_tier_and_scales_it_through_the_page() {
    let d = web_site("console", &[]);
    let dir = d
        .data
        .parent()
        .expect("the scratch directory")
        .to_path_buf();
    d.mint(&["tier", "scale", "web", "2"]);

    // The page is the daemon's own, under a policy that lets it load nothing else.
    let page = ureq::get(&format!("{}/ui", d.url)).call().unwrap();
    let policy = page
        .header("content-security-policy")
        .unwrap_or_default()
        .to_string();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
    let html = page.into_string().unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no asset from elsewhere"
    );

    let driver = Driver::start();
    let s = driver.session(&dir.join("profile"));
    s.go(&format!("{}/ui", d.url));
    // A wrong token is refused and the page says why.
    s.type_into("#token", "mint_op_nobody-holds-this");
    s.click("#signin-button");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.text("#signin-error").contains("not known") {
        assert!(Instant::now() < deadline, "the refusal was never shown");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.type_into("#token", &admin_token(&d.data));
    s.click("#signin-button");
    // All K instances, two running, with their identities.
    s.wait_count("#tier-web .cell", 8, Duration::from_secs(30));
    s.wait_count("#tier-web .cell.state-deployed", 2, Duration::from_secs(30));
    s.wait_count("#tier-web .cell.state-pooled", 6, Duration::from_secs(30));
    let cell = s.text("#tier-web .cell[data-index=\"2\"]");
    assert!(
        cell.contains("web-002") && cell.contains("198.18.0.4"),
        "{cell}"
    );
    assert_eq!(s.text("#tier-web .pool-depth"), "6");
    s.wait_count("#nodes tbody tr", 6, Duration::from_secs(10));
    assert!(s.text("#who").contains("admin"));

    // A scale through the page: the grid follows from the event stream alone.
    s.type_into("#scale-web", "5");
    s.click("#scale-web-button");
    s.wait_count("#tier-web .cell.state-deployed", 5, Duration::from_secs(60));
    assert_eq!(s.text("#tier-web .pool-depth"), "3");
    let events = s.text("#events");
    assert!(
        events.contains("scale-requested") && events.contains("deployed"),
        "{events}"
    );
    let tier = d.mint(&["tier", "show", "web"]);
    assert_eq!(
        tier["tier"]["desired"], 5,
        "the page's scale reached the daemon"
    );
    let shot = s.screenshot();
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let saved = root().join("target/console.png");
    std::fs::write(&saved, &shot).unwrap();
    eprintln!("screenshot: {}", saved.display());

    // A read-only token sees the same grid and no scale control.
    let read_only = dir.join("ro.token");
    d.mint(&[
        "token",
        "create",
        "--name",
        "viewer",
        "--role",
        "read-only",
        "--output",
        read_only.to_str().unwrap(),
    ]);
    s.click("#signout");
    s.type_into(
        "#token",
        std::fs::read_to_string(&read_only).unwrap().trim(),
    );
    s.click("#signin-button");
    s.wait_count("#tier-web .cell.state-deployed", 5, Duration::from_secs(30));
    assert!(
        s.all("#scale-web").is_empty(),
        "no scale control for a read-only token"
    );
    assert!(s.text("#who").contains("read-only"));
}
