//! The status page at `/`, rendered on the server from the master's `status json` and
//! `workers json`: a header, the pools, the workers, recent crashes and failed reloads. The
//! script (`page.js`, served at `/page.js`) refreshes the same tables from `/status.json`
//! every 2 s, building the same rows with the same `data-*` marks (the e2e test reads them).
//!
//! It owns the page's HTML, rendered from the lenient [`crate::view`] of the master (so a
//! newer or older master renders too). It never puts text into the page unescaped: pool,
//! plugin and worker names, states, reasons and messages come from the config and from
//! plugins, so they are untrusted; and it links nothing outside this server (the page works
//! under `default-src 'self'`).

use std::fmt::Write as _;

use crate::human::{duration, job_age, size};
use crate::view::{Pool, Recent, Reload, Status, Worker};

/// The page's script.
pub const SCRIPT: &str = include_str!("page.js");

/// The page's style sheet.
pub const STYLE: &str = include_str!("page.css");

/// The whole page. `rendered_at` is the wall-clock time of day shown until the script's
/// first refresh (`HH:MM:SS UTC`).
pub fn render(status: &Status, workers: &[Worker], rendered_at: &str) -> String {
    let mut out = String::with_capacity(8192);
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
    );
    let _ = writeln!(out, "<title>jobhost {}</title>", escape(&status.version));
    out.push_str(
        "<link rel=\"stylesheet\" href=\"/page.css\">\n</head>\n<body data-refreshes=\"0\">\n",
    );
    header(&mut out, status, rendered_at);
    out.push_str(
        "<div id=\"banner\" class=\"banner\" role=\"alert\" hidden>master not answering</div>\n",
    );

    out.push_str("<section>\n<h2>Pools</h2>\n<table id=\"pools\">\n<thead><tr>");
    for (title, _) in POOL_COLUMNS {
        let _ = write!(out, "<th>{title}</th>");
    }
    out.push_str("</tr></thead>\n<tbody id=\"pools-body\">\n");
    for pool in &status.pools {
        pool_row(&mut out, pool);
    }
    out.push_str("</tbody>\n</table>\n</section>\n");

    out.push_str("<section>\n<h2>Workers</h2>\n<table id=\"workers\">\n<thead><tr>");
    for (title, _) in WORKER_COLUMNS {
        let _ = write!(out, "<th>{title}</th>");
    }
    out.push_str("</tr></thead>\n<tbody id=\"workers-body\">\n");
    for worker in workers {
        worker_row(&mut out, worker);
    }
    out.push_str("</tbody>\n</table>\n</section>\n");

    out.push_str("<section>\n<h2>Recent crashes and failed reloads</h2>\n<ul id=\"recent\">\n");
    let events = recent(status);
    for event in &events {
        recent_item(&mut out, event);
    }
    out.push_str("</ul>\n");
    let _ = writeln!(
        out,
        "<p id=\"recent-none\" class=\"quiet\"{}>none</p>",
        if events.is_empty() { "" } else { " hidden" }
    );
    out.push_str("</section>\n<script src=\"/page.js\"></script>\n</body>\n</html>\n");
    out
}

/// The pools table's columns: heading and `data-field` (page.js has the same list).
const POOL_COLUMNS: [(&str, &str); 17] = [
    ("Pool", "name"),
    ("Plugin", "plugin"),
    ("Mode", "mode"),
    ("State", "state"),
    ("Workers", "workers"),
    ("Busy", "workers_busy"),
    ("Queued", "jobs_queued"),
    ("Running", "jobs_running"),
    ("In flight", "jobs_in_flight"),
    ("Done", "jobs_done"),
    ("Failed", "jobs_failed"),
    ("Retried", "jobs_retried"),
    ("Dropped", "jobs_dropped"),
    ("Crashes", "crashes"),
    ("Timeouts", "timeouts"),
    ("Source", "source"),
    ("Lag", "source_lag"),
];

/// The workers table's columns (page.js has the same list).
const WORKER_COLUMNS: [(&str, &str); 9] = [
    ("PID", "pid"),
    ("Pool", "pool"),
    ("Gen", "generation"),
    ("State", "state"),
    ("Job age", "job_age"),
    ("Jobs", "jobs_done"),
    ("RSS", "rss"),
    ("Own", "own"),
    ("Age", "age"),
];

fn header(out: &mut String, s: &Status, rendered_at: &str) {
    out.push_str("<header>\n<h1>jobhost</h1>\n<p class=\"meta\">");
    let _ = write!(
        out,
        "pid <b data-field=\"pid\">{}</b> · version <b data-field=\"version\">{}</b> · \
         up <b data-field=\"uptime\">{}</b> · generation <b data-field=\"generation\">{}</b> · \
         last reload <b data-field=\"last_reload\">{}</b>",
        s.pid,
        escape(&s.version),
        duration(s.uptime_secs.unwrap_or(0.0)),
        s.generation,
        escape(&last_reload(s.last_reload.as_ref()))
    );
    let _ = write!(
        out,
        "</p>\n<p class=\"meta\">config <code data-field=\"config\">{}</code> · \
         <span id=\"updated\">rendered {}</span></p>\n</header>\n",
        escape(&s.config),
        escape(rendered_at)
    );
}

/// `none`, `AT ok`, or `AT FAILED: message`.
fn last_reload(reload: Option<&Reload>) -> String {
    match reload {
        None => "none".to_owned(),
        Some(r) if r.ok => format!("{} ok", r.at),
        Some(r) => format!("{} FAILED: {}", r.at, r.message),
    }
}

fn pool_row(out: &mut String, p: &Pool) {
    let name = escape(&p.name);
    let (source, source_title, lag) = match &p.source {
        None => ("-".to_owned(), String::new(), "-".to_owned()),
        Some(src) => (
            format!("{} {}", src.kind, src.state),
            match &src.reason {
                Some(reason) => format!("{}: {reason}", src.address),
                None => src.address.clone(),
            },
            src.lag.map_or_else(|| "-".to_owned(), |l| l.to_string()),
        ),
    };
    let cells: [(&str, String); 17] = [
        ("name", p.name.clone()),
        ("plugin", format!("{}@{}", p.plugin, p.plugin_version)),
        ("mode", p.mode.clone()),
        ("state", p.state.clone()),
        (
            "workers",
            format!("{}/{}", p.workers_running, p.workers_wanted),
        ),
        ("workers_busy", p.workers_busy.to_string()),
        ("jobs_queued", p.jobs_queued.to_string()),
        ("jobs_running", p.jobs_running.to_string()),
        ("jobs_in_flight", p.jobs_in_flight.to_string()),
        ("jobs_done", p.jobs_done.to_string()),
        ("jobs_failed", p.jobs_failed.to_string()),
        ("jobs_retried", p.jobs_retried.to_string()),
        ("jobs_dropped", p.jobs_dropped.to_string()),
        ("crashes", p.crashes.to_string()),
        ("timeouts", p.timeouts.to_string()),
        ("source", source),
        ("source_lag", lag),
    ];
    let _ = write!(out, "<tr data-pool=\"{name}\">");
    for (field, text) in &cells {
        let _ = write!(out, "<td data-pool=\"{name}\" data-field=\"{field}\"");
        match *field {
            "state" => {
                let _ = write!(out, " class=\"state {}\"", state_class(&p.state));
            }
            "source" if !source_title.is_empty() => {
                let _ = write!(out, " title=\"{}\"", escape(&source_title));
            }
            _ => {}
        }
        let _ = write!(out, ">{}</td>", escape(text));
    }
    out.push_str("</tr>\n");
}

fn worker_row(out: &mut String, w: &Worker) {
    let dash = || "-".to_owned();
    let cells: [(&str, String); 9] = [
        ("pid", w.pid.to_string()),
        ("pool", w.pool.clone()),
        ("generation", w.generation.to_string()),
        ("state", w.state.clone()),
        ("job_age", w.job_age_secs.map_or_else(dash, job_age)),
        ("jobs_done", w.jobs_done.to_string()),
        ("rss", w.rss_bytes.map_or_else(dash, size)),
        ("own", w.own_bytes.map_or_else(dash, size)),
        ("age", duration(w.age_secs.unwrap_or(0.0))),
    ];
    let _ = write!(out, "<tr data-worker=\"{}\">", w.pid);
    for (field, text) in &cells {
        let _ = write!(out, "<td data-field=\"{field}\"");
        if *field == "state" {
            let _ = write!(out, " class=\"state {}\"", state_class(&w.state));
        }
        let _ = write!(out, ">{}</td>", escape(text));
    }
    out.push_str("</tr>\n");
}

/// The list under "recent": the master's `recent` events, and the last reload if it failed
/// and `recent` does not hold it already.
fn recent(s: &Status) -> Vec<Recent> {
    let mut events: Vec<Recent> = s
        .recent
        .iter()
        .map(|e| Recent {
            at: e.at.clone(),
            kind: e.kind.clone(),
            pool: e.pool.clone(),
            pid: e.pid,
            reason: e.reason.clone(),
        })
        .collect();
    if let Some(r) = s.last_reload.as_ref().filter(|r| !r.ok) {
        let listed = events
            .iter()
            .any(|e| e.kind == "reload-failed" && e.at == r.at);
        if !listed {
            events.insert(
                0,
                Recent {
                    at: r.at.clone(),
                    kind: "reload-failed".to_owned(),
                    pool: None,
                    pid: None,
                    reason: r.message.clone(),
                },
            );
        }
    }
    events
}

fn recent_item(out: &mut String, e: &Recent) {
    let _ = write!(
        out,
        "<li data-kind=\"{}\"><time>{}</time> <span class=\"kind {}\">{}</span>",
        escape(&e.kind),
        escape(&e.at),
        state_class(&e.kind),
        escape(&e.kind)
    );
    if let Some(pool) = &e.pool {
        let _ = write!(out, " pool <b>{}</b>", escape(pool));
    }
    if let Some(pid) = e.pid {
        let _ = write!(out, " pid <b>{pid}</b>");
    }
    let _ = writeln!(
        out,
        ": <span class=\"reason\">{}</span></li>",
        escape(&e.reason)
    );
}

/// A CSS class for a state word: `state-` and the word if it is plain (`ok`, `backing-off`),
/// `state-other` for anything else.
fn state_class(state: &str) -> String {
    if !state.is_empty() && state.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
        format!("state-{state}")
    } else {
        "state-other".to_owned()
    }
}

/// `text` safe inside an element or a double- or single-quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The UTC time of day of `unix_secs`, `HH:MM:SS UTC`.
pub fn time_of_day(unix_secs: u64) -> String {
    let s = unix_secs % 86400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s % 3600 / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert('x')</script>\"&";

    fn hostile_status() -> Status {
        serde_json::from_value(serde_json::json!({
            "pid": 42, "version": "0.1.0", "uptime_secs": 3725.0, "generation": 3,
            "config": "/etc/<jobhost>.toml",
            "last_reload": {"at": "2026-12-02T18:00:00Z", "ok": false, "message": HOSTILE},
            "pools": [{
                "name": HOSTILE, "plugin": "echo", "plugin_version": "1.0", "mode": "jobs",
                "workers_wanted": 2, "workers_running": 1, "jobs_queued": 3, "jobs_done": 7,
                "state": "backing-off",
                "source": {"kind": "redis", "address": "redis://x", "state": "disconnected",
                           "reason": HOSTILE, "lag": 12}
            }],
            "recent": [{"at": "2026-12-02T18:01:00Z", "kind": "crash", "pool": HOSTILE,
                        "pid": 99, "reason": "killed by SIGSEGV <b>"}],
            "a_field_from_the_future": true
        }))
        .expect("a status")
    }

    #[test]
    fn untrusted_text_is_escaped_everywhere() {
        let workers: crate::view::WorkerList =
            serde_json::from_value(serde_json::json!({"workers": [
                {"pid": 7, "pool": HOSTILE, "state": "<busy>", "job_age_secs": 1.23,
                 "jobs_done": 5, "rss_bytes": 2048, "own_bytes": null, "age_secs": 61.0}
            ]}))
            .expect("workers");
        let page = render(&hostile_status(), &workers.workers, "18:00:00 UTC");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<b>\""), "{page}");
        assert!(!page.contains("SIGSEGV <b>"), "{page}");
        assert!(!page.contains("<jobhost>"), "{page}");
        assert!(!page.contains("<busy>"), "{page}");
        let escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;";
        assert!(
            page.contains(&format!(
                "<td data-pool=\"{escaped}\" data-field=\"jobs_queued\">3</td>"
            )),
            "{page}"
        );
        assert!(
            page.contains("data-field=\"state\" class=\"state state-other\">&lt;busy&gt;</td>"),
            "{page}"
        );
        // The only script is the page's own, by address.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<script src=\"/page.js\"></script>"));
    }

    #[test]
    fn the_figures_are_marked_for_tests() {
        let workers: crate::view::WorkerList =
            serde_json::from_value(serde_json::json!({"workers": [
                {"pid": 7, "pool": "echo", "generation": 1, "state": "idle", "job_age_secs": null,
                 "jobs_done": 5, "rss_bytes": 2048, "own_bytes": 1536, "age_secs": 61.0}
            ]}))
            .expect("workers");
        let page = render(&hostile_status(), &workers.workers, "18:00:00 UTC");
        for needle in [
            "<b data-field=\"pid\">42</b>",
            "<b data-field=\"uptime\">1h02m</b>",
            "<b data-field=\"generation\">3</b>",
            "data-field=\"jobs_done\">7</td>",
            "data-field=\"workers\">1/2</td>",
            "data-field=\"source\" title=\"redis://x: &lt;script&gt;",
            "data-field=\"source_lag\">12</td>",
            "<tr data-worker=\"7\">",
            "<td data-field=\"state\" class=\"state state-idle\">idle</td>",
            "<td data-field=\"job_age\">-</td>",
            "<td data-field=\"rss\">2.0K</td><td data-field=\"own\">1.5K</td><td data-field=\"age\">1m01s</td>",
            "<li data-kind=\"crash\"><time>2026-12-02T18:01:00Z</time>",
            "pid <b>99</b>: <span class=\"reason\">killed by SIGSEGV &lt;b&gt;</span>",
            // The failed reload is listed (recent did not hold it), newest-first order kept.
            "<li data-kind=\"reload-failed\"><time>2026-12-02T18:00:00Z</time>",
            "<p id=\"recent-none\" class=\"quiet\" hidden>none</p>",
            "<span id=\"updated\">rendered 18:00:00 UTC</span>",
        ] {
            assert!(page.contains(needle), "{needle} not in {page}");
        }
    }

    #[test]
    fn a_failed_reload_already_in_recent_is_listed_once() {
        let mut status = hostile_status();
        status.recent.push(Recent {
            at: "2026-12-02T18:00:00Z".into(),
            kind: "reload-failed".into(),
            reason: "x".into(),
            ..Recent::default()
        });
        assert_eq!(recent(&status).len(), 2);
        status.last_reload = Some(Reload {
            ok: true,
            ..Reload::default()
        });
        status.recent.clear();
        assert!(recent(&status).is_empty());
        let page = render(&status, &[], "00:00:00 UTC");
        assert!(page.contains("<p id=\"recent-none\" class=\"quiet\">none</p>"));
    }

    #[test]
    fn an_empty_or_old_status_still_renders() {
        let status: Status = serde_json::from_str("{}").expect("lenient");
        let page = render(&status, &[], "00:00:00 UTC");
        assert!(page.contains("<tbody id=\"pools-body\">\n</tbody>"));
        assert!(page.contains("last reload <b data-field=\"last_reload\">none</b>"));
    }

    #[test]
    fn figures_for_people() {
        assert_eq!(time_of_day(86400 * 3 + 3600 + 62), "01:01:02 UTC");
        assert_eq!(state_class("backing-off"), "state-backing-off");
        assert_eq!(state_class("x\" onclick=\"y"), "state-other");
    }
}
