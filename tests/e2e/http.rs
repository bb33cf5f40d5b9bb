//! `[admin] http`: the supervised HTTP child of a real master, on a free loopback port —
//! `/metrics` in both formats (checked by `promtool`, scraped by a real Prometheus), the token,
//! the status page in headless Chromium against `status json`, the child's supervision, and
//! abuse that must not reach the master nor keep the child down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{
    bin_dir, children_of, config_with, have, in_sleep_job, prerequisite, promtool_check, run,
    wait_until, wait_until_quiet, Env, Master, SOON,
};

const TOKEN: &str = "http-token-0123456789abcdef";

/// A free loopback port (bound, then let go for the master to bind).
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("its address").port()
}

/// Writes the token file (0600: the master refuses one others may read).
fn write_token(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = env.path().join("admin.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write the token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A master with `[admin] http` on a free port and the given pools; returns once the child
/// serves `/metrics`.
fn start(env: &Env, pools: &str) -> (Master, u16) {
    write_token(env);
    let port = free_port();
    let master = env.start_master(&config_with(&format!(
        "[admin]\nhttp = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n\n{pools}"
    )));
    wait_until("the http child serves /metrics", SOON, || {
        try_get(port, "/metrics", &bearer()).is_some_and(|r| r.status == 200)
    });
    (master, port)
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request (the child closes every connection); `None` if there was no whole reply.
fn try_get(port: u16, path: &str, headers: &str) -> Option<Reply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(SOON)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

fn get(port: u16, path: &str, headers: &str) -> Reply {
    try_get(port, path, headers).unwrap_or_else(|| panic!("no reply to GET {path}"))
}

/// A JSON line from the admin socket (`status json`, `workers json`).
fn admin_json(master: &Master, command: &str) -> serde_json::Value {
    let reply = master.admin(command);
    let line = reply.lines().next().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{command}: {e}: {reply}"))
}

/// A pool's field in `status json`.
fn pool_figure(status: &serde_json::Value, pool: &str, field: &str) -> u64 {
    status["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
        .and_then(|p| p[field].as_u64())
        .unwrap_or_else(|| panic!("no {field} of {pool} in {status}"))
}

/// The value of a metric line `name{labels} VALUE` in exposition text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// The master's child running `jobhost http-serve`.
fn http_child(master: &Master) -> Option<i32> {
    children_of(master.pid()).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"http-serve"))
    })
}

/// Runs jobs to their end.
fn run_echo_jobs(master: &Master, n: usize) {
    let mut client = master.client();
    for i in 0..n {
        let payload = format!("job {i}");
        let result = client
            .call("echo", payload.as_bytes())
            .expect("an echo job");
        assert_eq!(result.body, payload.as_bytes());
    }
}

#[test]
fn metrics_come_in_both_formats_with_the_token_and_pass_promtool() {
    let env = Env::new();
    env.install("echo");
    let (master, port) = start(
        &env,
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n",
    );
    run_echo_jobs(&master, 7);
    let done = pool_figure(&admin_json(&master, "status json"), "echo", "jobs_done");
    assert_eq!(done, 7);

    // The Prometheus text format, by default. (Replies are cached for a second: wait for one
    // that was rendered after the jobs.)
    let series = "jobhost_pool_jobs_completed_total{pool=\"echo\"}";
    let mut plain = get(port, "/metrics", &bearer());
    wait_until("/metrics to count the 7 jobs", SOON, || {
        plain = get(port, "/metrics", &bearer());
        sample(&plain.body, series) == Some(7.0)
    });
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        plain.header("Content-Length"),
        Some(plain.body.len().to_string().as_str())
    );
    assert!(!plain.body.contains("# EOF"));

    // OpenMetrics, for who asks for it.
    let om = get(
        port,
        "/metrics",
        &format!(
            "{}Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
            bearer()
        ),
    );
    assert_eq!(om.status, 200);
    assert_eq!(
        om.header("Content-Type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert_eq!(sample(&om.body, series), Some(7.0), "{}", om.body);
    assert!(!om.body.contains("\nOK\n"));

    // Basic with the token as the password works too; a missing or wrong token is a 401.
    let basic = "Authorization: Basic dTpodHRwLXRva2VuLTAxMjM0NTY3ODlhYmNkZWY=\r\n";
    assert_eq!(get(port, "/metrics", basic).status, 200);
    for headers in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_owned(),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
    ] {
        let reply = get(port, "/metrics", &headers);
        assert_eq!(reply.status, 401, "{headers:?}");
        assert_eq!(
            reply.header("WWW-Authenticate"),
            Some("Basic realm=\"jobhost\", charset=\"UTF-8\"")
        );
        assert!(!reply.body.contains("jobhost_"));
    }

    if prerequisite(
        have("promtool"),
        "promtool is not installed (Debian: prometheus)",
    ) {
        let (ok, said) = promtool_check(&plain.body);
        assert!(
            ok,
            "promtool check metrics failed:\n{said}\n--- the metrics:\n{}",
            plain.body
        );
    }
}

/// A process killed (and waited for) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET on Prometheus's HTTP API, the JSON body.
fn prometheus_api(port: u16, path: &str) -> Option<serde_json::Value> {
    let reply = try_get(port, path, "Connection: close\r\n")?;
    (reply.status == 200)
        .then(|| serde_json::from_str(&reply.body).ok())
        .flatten()
}

#[test]
fn a_real_prometheus_scrapes_the_child() {
    if !prerequisite(
        have("prometheus"),
        "prometheus is not installed (Debian: prometheus)",
    ) {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let (master, port) = start(&env, "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n");
    run_echo_jobs(&master, 5);
    let prom_port = free_port();
    let config = env.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: jobhost\n    authorization:\n      type: Bearer\n      \
             credentials_file: {}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n",
            env.path().join("admin.token").display()
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(env.path().join("prometheus.log")).expect("its log");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                env.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus"),
    );
    let prometheus_log =
        || std::fs::read_to_string(env.path().join("prometheus.log")).unwrap_or_default();
    let within = Duration::from_secs(90);
    let deadline = Instant::now() + within;
    let mut targets = serde_json::Value::Null;
    loop {
        if let Some(t) = prometheus_api(prom_port, "/api/v1/targets") {
            targets = t;
            let target = &targets["data"]["activeTargets"][0];
            if target["health"] == "up" && target["lastError"] == "" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the target is not up after {within:?}: {targets}\n{}",
            prometheus_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let query = "/api/v1/query?query=jobhost_pool_jobs_completed_total%7Bpool%3D%22echo%22%7D";
    let mut answer = serde_json::Value::Null;
    let found = |answer: &serde_json::Value| answer["data"]["result"][0]["value"][1] == "5";
    while !found(&answer) {
        assert!(
            Instant::now() < deadline,
            "Prometheus does not have the figure: {answer}\n{}",
            prometheus_log()
        );
        std::thread::sleep(Duration::from_millis(200));
        answer = prometheus_api(prom_port, query).unwrap_or_default();
    }
}

/// The text of the element that carries `marks` (e.g. `data-pool="echo" data-field="jobs_done"`).
fn marked(dom: &str, marks: &str) -> Option<String> {
    let at = dom.find(marks)?;
    let rest = &dom[at..];
    let open = rest.find('>')?;
    let text = &rest[open + 1..];
    Some(text[..text.find('<')?].to_owned())
}

/// Chromium's common flags for a headless run in `profile`.
fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

#[test]
fn the_status_page_in_chromium_shows_what_status_json_says() {
    if !prerequisite(
        have("chromium"),
        "chromium is not installed (Debian: chromium)",
    ) {
        return;
    }
    let env = Env::new();
    env.install("echo");
    env.install("sleep");
    let (master, port) = start(
        &env,
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n\
         [[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\njob_timeout = \"0\"\n",
    );
    // A quiet state: echo idle after 6 jobs; sleep's one worker busy with a long job, a few
    // more handed to it ahead (prefetch) and the rest queued: nothing moves while the test
    // looks.
    run_echo_jobs(&master, 6);
    // One crash for the "recent" list: an echo worker killed by nobody the master knows.
    let victim = admin_json(&master, "workers json")["workers"]
        .as_array()
        .and_then(|list| list.iter().find(|w| w["pool"] == "echo"))
        .and_then(|w| w["pid"].as_i64())
        .expect("an echo worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill an echo worker");
    wait_until("the crash recorded and the worker replaced", SOON, || {
        let status = admin_json(&master, "status json");
        status["recent"][0]["pid"] == victim && pool_figure(&status, "echo", "workers_running") == 2
    });
    let mut sleeper = master.client();
    for id in 1..=12 {
        sleeper
            .send(id, "sleep", b"600000")
            .expect("submit a sleep job");
    }
    sleeper.flush().expect("flush");
    let deadline = Instant::now() + SOON;
    let mut last = serde_json::Value::Null;
    loop {
        let status = admin_json(&master, "status json");
        let settled = pool_figure(&status, "sleep", "workers_busy") == 1
            && pool_figure(&status, "sleep", "jobs_queued") > 0
            && status["pools"] == last["pools"];
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "the sleep jobs: {status}");
        last = status;
        std::thread::sleep(Duration::from_millis(100));
    }
    let workers_of = |doc: &serde_json::Value| -> Vec<(i64, String)> {
        let mut list: Vec<(i64, String)> = doc["workers"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|w| {
                (
                    w["pid"].as_i64().expect("pid"),
                    w["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        list.sort();
        list
    };
    let before = workers_of(&admin_json(&master, "workers json"));
    assert_eq!(before.len(), 3, "{before:?}");
    let sleeping: Vec<i64> = before
        .iter()
        .filter(|(_, state)| state == "busy")
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(sleeping.len(), 1, "{before:?}");
    wait_until("the sleep job to be in its sleep", SOON, || {
        in_sleep_job(sleeping[0] as i32)
    });

    let url = format!("http://u:{TOKEN}@127.0.0.1:{port}/");
    let dump = run(chromium(&env.path().join("chromium-dom"))
        .args(["--virtual-time-budget=10000", "--dump-dom"])
        .arg(&url));
    let dom = dump.stdout;
    let status = admin_json(&master, "status json");
    assert_eq!(
        status["pools"], last["pools"],
        "the pools changed while the page loaded"
    );
    let after = workers_of(&admin_json(&master, "workers json"));
    assert_eq!(before, after, "the workers changed while the page loaded");
    assert!(
        dom.contains("<tbody id=\"pools-body\">"),
        "no page:\n{dom}\n{}",
        dump.stderr
    );

    // The script ran, fetched /status.json (authenticated by the session cookie) at least once
    // and rebuilt the tables.
    let refreshes: u64 = dom
        .split("data-refreshes=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refreshes >= 1, "the page never refreshed:\n{dom}");
    assert!(dom.contains("id=\"updated\">updated "), "{dom}");
    assert!(
        dom.contains("id=\"banner\" class=\"banner\" role=\"alert\" hidden"),
        "{dom}"
    );

    for pool in ["echo", "sleep"] {
        for field in [
            "jobs_queued",
            "jobs_done",
            "jobs_running",
            "jobs_in_flight",
            "workers_busy",
        ] {
            let shown = marked(
                &dom,
                &format!("data-pool=\"{pool}\" data-field=\"{field}\""),
            );
            assert_eq!(
                shown,
                Some(pool_figure(&status, pool, field).to_string()),
                "{pool} {field} in\n{dom}"
            );
        }
    }
    assert_eq!(
        marked(&dom, "data-pool=\"echo\" data-field=\"jobs_done\"").as_deref(),
        Some("6")
    );
    for (pid, state) in &after {
        let row = dom
            .find(&format!("<tr data-worker=\"{pid}\">"))
            .map(|at| &dom[at..])
            .unwrap_or_else(|| panic!("no row for worker {pid}:\n{dom}"));
        let row = &row[..row.find("</tr>").unwrap_or(row.len())];
        assert_eq!(
            marked(row, "data-field=\"pid\"").as_deref(),
            Some(pid.to_string().as_str())
        );
        assert_eq!(
            marked(row, "data-field=\"state\"").as_deref(),
            Some(state.as_str()),
            "{row}"
        );
    }
    assert_eq!(
        dom.matches("<tr data-worker=").count(),
        after.len(),
        "{dom}"
    );
    // The crash, with its reason, and nothing else under "recent".
    let crash = &status["recent"][0];
    assert_eq!(crash["kind"], "crash", "{status}");
    assert_eq!(dom.matches("<li data-kind=").count(), 1, "{dom}");
    let item = dom
        .find("<li data-kind=\"crash\">")
        .map(|at| &dom[at..])
        .unwrap_or_else(|| panic!("no crash listed:\n{dom}"));
    let item = &item[..item.find("</li>").unwrap_or(item.len())];
    let reason = crash["reason"].as_str().expect("a reason");
    assert!(!reason.is_empty());
    assert_eq!(
        marked(item, "class=\"reason\"").as_deref(),
        Some(reason),
        "{item}"
    );
    assert!(item.contains(&format!("pid <b>{victim}</b>")), "{item}");
    assert!(item.contains("pool <b>echo</b>"), "{item}");

    // The screenshot, for people.
    let shots = bin_dir()
        .parent()
        .expect("a target dir above the profile's")
        .join("screenshots");
    std::fs::create_dir_all(&shots).expect("mkdir target/screenshots");
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    run(chromium(&env.path().join("chromium-shot"))
        .args([
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
            "--hide-scrollbars",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url));
    let image =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(image.len() > 1000, "a {}-byte screenshot", image.len());
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    drop(sleeper);
}

#[test]
fn the_child_is_restarted_and_abuse_never_reaches_the_master() {
    let env = Env::new();
    env.install("echo");
    let (master, port) = start(&env, "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n");
    let child = http_child(&master).expect("an http-serve child");

    // Garbage, a huge head, half-sent heads, a slowloris crowd past the connection limit.
    let send = |bytes: &[u8]| -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(SOON));
        let _ = s.write_all(bytes);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    assert!(send(b"\x00\xff\x16\x03garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(100_000, b'x');
    let reply = send(&huge);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431 "),
        "{reply}"
    );
    let slow: Vec<TcpStream> = (0..40)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(slow.len(), 40);
    // Meanwhile the master answers jobs and admin commands as ever.
    run_echo_jobs(&master, 20);
    assert!(master.admin("status").ends_with("OK\n"));
    // The crowd is timed out by the child; then requests are served again.
    drop(slow);
    wait_until("/metrics served after the abuse", SOON, || {
        try_get(port, "/metrics", &bearer()).is_some_and(|r| r.status == 200)
    });
    assert_eq!(
        http_child(&master),
        Some(child),
        "the child did not stay up"
    );
    // And neither it nor the master spins afterwards.
    wait_until_quiet(child, "the http child");
    wait_until_quiet(master.pid(), "the master");

    // Killed, it is started again (after its back-off) and serves again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the child");
    wait_until("a new http child", SOON, || {
        http_child(&master).is_some_and(|pid| pid != child)
    });
    wait_until("/metrics served by the new child", SOON, || {
        try_get(port, "/metrics", &bearer()).is_some_and(|r| r.status == 200)
    });
    master.wait_for_log(&format!("http child {child} ended"), SOON);
    run_echo_jobs(&master, 3);
}

#[test]
fn the_http_listener_needs_allow_remote_beyond_loopback() {
    let env = Env::new();
    env.install("echo");
    write_token(&env);
    env.config(&config_with(
        "[admin]\nhttp = \"0.0.0.0:9120\"\ntoken_file = \"admin.token\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(1)
        .assert_stderr_has("admin.http")
        .assert_stderr_has("allow_remote");
}
