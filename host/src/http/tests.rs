//! The child's HTTP side against a fake master (a thread on the other end of a socketpair),
//! over real loopback connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::*;

const TOKEN: &str = "the-token";

const STATUS: &str = r#"{"pid":4242,"version":"0.1.0","uptime_secs":12.5,"config":"/x.toml","generation":1,"generations_loaded":1,"last_reload":null,"pools":[{"name":"<script>alert(1)</script>","plugin":"echo","plugin_version":"0.1.0","mode":"jobs","workers_wanted":2,"workers_running":2,"workers_busy":0,"jobs_queued":3,"jobs_running":0,"jobs_done":17,"jobs_failed":0,"jobs_retried":0,"jobs_dropped":0,"crashes":0,"timeouts":0,"recycled":0,"stopped":0,"state":"ok"}],"workers":[]}"#;
const WORKERS: &str = r#"{"workers":[{"pid":501,"pool":"echo","generation":1,"state":"idle","job_age_secs":null,"jobs_done":9,"rss_bytes":4096,"own_bytes":1024,"started":"x","age_secs":3.0}]}"#;

/// A child serving on a free loopback port, its master a fake that answers the four commands
/// (counting what it was asked).
fn start() -> (SocketAddr, Arc<AtomicUsize>) {
    let (session, asked) = link::tests::fake_master(|line| match line {
        "status json" => format!("{STATUS}\nOK\n"),
        "workers json" => format!("{WORKERS}\nOK\n"),
        "metrics" => "# TYPE jobhost_up gauge\njobhost_up 1\n# EOF\nOK\n".to_owned(),
        "metrics prometheus" => "# TYPE jobhost_up gauge\njobhost_up 1\nOK\n".to_owned(),
        _ => "ERR unknown command\n".to_owned(),
    });
    let link = MasterLink::start(session, |_| {}).expect("start the link");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Arc::new(Server::new(link, TOKEN.as_bytes().to_vec()));
    std::thread::spawn(move || accept_loop(&listener, &server));
    (addr, asked)
}

/// Sends `request` as it is, reads the whole reply (the child closes every connection).
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(request).expect("send");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("read the reply");
    String::from_utf8(reply).expect("text")
}

fn get(addr: SocketAddr, path: &str, headers: &str) -> String {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes(),
    )
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

fn status_of(reply: &str) -> u16 {
    reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"))
}

fn body_of(reply: &str) -> &str {
    reply.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

fn header_of<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let head = reply.split_once("\r\n\r\n").map_or(reply, |(head, _)| head);
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn without_the_token_it_is_401_with_a_basic_challenge() {
    let (addr, asked) = start();
    for headers in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_owned(),
        format!("Cookie: {}=nope\r\n", request::SESSION_COOKIE),
    ] {
        let reply = get(addr, "/metrics", &headers);
        assert_eq!(status_of(&reply), 401, "{reply}");
        assert_eq!(
            header_of(&reply, "WWW-Authenticate"),
            Some("Basic realm=\"jobhost\", charset=\"UTF-8\"")
        );
    }
    assert_eq!(status_of(&get(addr, "/nowhere", "")), 401);
    assert_eq!(asked.load(Ordering::SeqCst), 0, "the master was asked");
}

#[test]
fn metrics_are_negotiated_by_accept() {
    let (addr, _) = start();
    let reply = get(addr, "/metrics", &bearer());
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert_eq!(
        header_of(&reply, "Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(body_of(&reply), "# TYPE jobhost_up gauge\njobhost_up 1\n");
    let accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n";
    let reply = get(addr, "/metrics?x", &format!("{}{accept}", bearer()));
    assert_eq!(
        header_of(&reply, "Content-Type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(
        body_of(&reply),
        "# TYPE jobhost_up gauge\njobhost_up 1\n# EOF\n"
    );
    assert_eq!(header_of(&reply, "Content-Length"), Some("43"));
    for name in ["Cache-Control", "X-Content-Type-Options", "Connection"] {
        assert!(header_of(&reply, name).is_some(), "{name} missing: {reply}");
    }
}

#[test]
fn basic_auth_gets_the_page_and_a_cookie_that_works_for_the_script() {
    let (addr, _) = start();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{TOKEN}"));
    let reply = get(addr, "/", &format!("Authorization: Basic {basic}\r\n"));
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert_eq!(
        header_of(&reply, "Content-Type"),
        Some("text/html; charset=utf-8")
    );
    assert!(header_of(&reply, "Content-Security-Policy")
        .is_some_and(|csp| csp.contains("script-src 'self'")));
    let body = body_of(&reply);
    assert_eq!(
        header_of(&reply, "Content-Length"),
        Some(body.len().to_string().as_str())
    );
    assert!(!body.contains("<script>alert"), "{body}");
    assert!(body.contains("data-field=\"jobs_queued\">3</td>"), "{body}");
    assert!(body.contains("<tr data-worker=\"501\">"), "{body}");
    let cookie = header_of(&reply, "Set-Cookie").expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    assert!(!pair.contains(TOKEN));

    let reply = get(addr, "/status.json", &format!("Cookie: a=b; {pair}\r\n"));
    assert_eq!(status_of(&reply), 200, "{reply}");
    let json: serde_json::Value = serde_json::from_str(body_of(&reply)).expect("json");
    assert_eq!(json["status"]["pid"], 4242);
    assert_eq!(json["workers"][0]["pid"], 501);
    // A page loaded with the cookie sets none.
    let reply = get(addr, "/", &format!("Cookie: {pair}\r\n"));
    assert_eq!(status_of(&reply), 200);
    assert_eq!(header_of(&reply, "Set-Cookie"), None);
    for (path, kind) in [("/page.js", "text/javascript"), ("/page.css", "text/css")] {
        let reply = get(addr, path, &format!("Cookie: {pair}\r\n"));
        assert!(header_of(&reply, "Content-Type").is_some_and(|t| t.starts_with(kind)));
    }
}

#[test]
fn head_other_methods_and_unknown_paths() {
    let (addr, _) = start();
    let full = get(addr, "/metrics", &bearer());
    let reply = exchange(
        addr,
        format!("HEAD /metrics HTTP/1.1\r\n{}\r\n", bearer()).as_bytes(),
    );
    assert_eq!(status_of(&reply), 200);
    assert_eq!(body_of(&reply), "");
    assert_eq!(
        header_of(&reply, "Content-Length"),
        header_of(&full, "Content-Length")
    );
    let reply = exchange(
        addr,
        format!("POST / HTTP/1.1\r\n{}\r\n", bearer()).as_bytes(),
    );
    assert_eq!(status_of(&reply), 405);
    assert_eq!(header_of(&reply, "Allow"), Some("GET, HEAD"));
    for path in ["/metrics/", "/../../etc/passwd", "/favicon.ico", "//"] {
        assert_eq!(status_of(&get(addr, path, &bearer())), 404, "{path}");
    }
    let reply = get(addr, "/", &format!("{}Content-Length: 3\r\n", bearer()));
    assert_eq!(status_of(&reply), 400);
}

#[test]
fn garbage_and_huge_heads_are_answered_and_the_child_stays_up() {
    let (addr, _) = start();
    assert_eq!(
        status_of(&exchange(addr, b"\x16\x03\x01\x00\xff\r\n\r\n")),
        400
    );
    assert_eq!(
        status_of(&exchange(addr, b"GET / HTTP/1.1\r\nno colon\r\n\r\n")),
        400
    );
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.resize(64 * 1024, b'a');
    // The child answers after 8 KiB; the rest may meet a closed connection.
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _ = stream.write_all(&huge);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.is_empty() || status_of(&reply) == 431, "{reply}");
    // A connection that closes at once, or half-way through a head.
    drop(TcpStream::connect(addr).expect("connect"));
    let mut half = TcpStream::connect(addr).expect("connect");
    half.write_all(b"GET / HT").expect("send");
    drop(half);
    assert_eq!(status_of(&get(addr, "/metrics", &bearer())), 200);
}

#[test]
fn a_slow_head_times_out_and_a_full_house_of_them_makes_room_for_a_whole_request() {
    let (addr, _) = start();
    // Slowloris: every connection sends a little, never a whole head.
    let slow: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nX: ").expect("send");
            s
        })
        .collect();
    // Each whole request is served, whether a slot was free or the oldest slow head ended.
    const SERVED: usize = 8;
    for _ in 0..SERVED {
        let reply = get(addr, "/metrics", &bearer());
        assert_eq!(status_of(&reply), 200, "{reply}");
    }
    // The slow ones are answered 408 by the deadline, but for those ended to make room
    // (closed without a reply); the first ones to come are the ones ended first.
    let mut ended = 0;
    let mut timed_out = 0;
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        if reply.is_empty() {
            ended += 1;
        } else {
            assert_eq!(status_of(&reply), 408, "{reply}");
            timed_out += 1;
        }
    }
    assert!(ended <= SERVED, "{ended} ended");
    assert!(
        timed_out >= MAX_CONNECTIONS - SERVED,
        "{timed_out} timed out"
    );
    assert_eq!(status_of(&get(addr, "/metrics", &bearer())), 200);
}

#[test]
fn a_flood_of_requests_costs_the_master_a_few_commands() {
    let (addr, asked) = start();
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let reply = get(addr, "/metrics", &bearer());
                    assert!(matches!(status_of(&reply), 200 | 503), "{reply}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("join");
    }
    let secs = started.elapsed().as_secs() + 1;
    let n = asked.load(Ordering::SeqCst) as u64;
    assert!(n <= secs + 1, "{n} commands in {secs}s");
}

#[test]
fn a_refusing_master_is_a_502_with_its_reason() {
    let (session, _) = link::tests::fake_master(|_| "ERR unknown command \"metrics\"\n".to_owned());
    let link = MasterLink::start(session, |_| {}).expect("start the link");
    let server = Server::new(link, TOKEN.as_bytes().to_vec());
    let head = request::parse_head(format!("GET /metrics HTTP/1.1\r\n{}\r\n", bearer()).as_bytes())
        .expect("parses")
        .expect("complete");
    let response = respond(&server, &head);
    assert_eq!(response.status, 502);
    assert!(String::from_utf8_lossy(&response.body).contains("unknown command"));
}
