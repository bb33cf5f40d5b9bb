//! Memory limits against real memory: `max_rss` counts a worker's own pages (not what it shares
//! with the master), a worker that cannot get going is replaced with back-off, and a worker
//! holding back for lack of memory neither takes jobs nor has them time out.

use std::time::{Duration, Instant};

use jobhost_e2e::{config_with, wait_until, Env, SOON};

#[test]
fn max_rss_counts_a_workers_own_memory_not_the_preloaded_table_it_shares() {
    // Every worker maps the 96 MiB table built in the master; its RSS is well over 64 MiB,
    // but its own memory is not — so it serves instead of recycling before every job.
    let env = Env::new();
    env.install("lookup");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"lookup\"\nplugin = \"lookup\"\nworkers = 2\nmax_rss = \"64MiB\"\n[pool.settings]\ntable_mib = 96\n",
    ));
    let workers = master.wait_for_workers(2);
    let mut client = master.client();
    for key in 0..300u32 {
        let r = client.call("lookup", key.to_string().as_bytes()).unwrap();
        assert!(r.is_ok(), "{}", r.text());
    }
    for pid in &workers {
        let rss = jobhost::sys::rss_of(nix::unistd::Pid::from_raw(*pid)).unwrap();
        assert!(
            rss > 64 << 20,
            "the worker maps the table: RSS {} MiB",
            rss >> 20
        );
    }
    assert_eq!(master.workers(), workers, "no worker was recycled");
    assert_eq!(
        master.log_count("recycled (max_rss reached)"),
        0,
        "{}",
        master.log_text()
    );
}

#[test]
fn a_worker_that_recycles_before_its_first_job_is_replaced_with_back_off() {
    // The table is built in each worker (its own memory) and is over max_rss from the start:
    // every worker recycles before its first job. Replacing it at once would fork in a loop.
    let env = Env::new();
    env.install("lookup");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"lookup\"\nplugin = \"lookup\"\nworkers = 1\nmax_rss = \"16MiB\"\n[pool.settings]\ntable_mib = 32\nbuild_in = \"worker_start\"\n",
    ));
    let started = Instant::now();
    master.wait_for_log("pool lookup: next worker in 200ms", SOON);
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    let forks = master.log_count("recycling after 0 jobs");
    let seconds = started.elapsed().as_secs_f64();
    // 100 ms, 200 ms, 400 ms, 800 ms, 1.6 s …: a handful, where a loop would be hundreds.
    assert!(
        (2..=8).contains(&forks),
        "{forks} workers in {seconds:.1} s:\n{}",
        master.log_text()
    );
}

#[test]
fn a_worker_short_of_memory_holds_its_jobs_without_timing_them_out_until_memory_is_back() {
    let env = Env::new();
    env.install("sleep");
    // No machine has 1000 TiB available: the worker holds back from the start.
    let pool = |min: &str| {
        format!("[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\njob_timeout = \"1s\"\nmin_available_memory = \"{min}\"\n")
    };
    let master = env.start_master(&config_with(&pool("1000TiB")));
    let workers = master.wait_for_workers(1);
    master.wait_for_log("taking no jobs until it recovers", SOON);
    let (mut sender, mut receiver) = master.client().split();
    for id in 0..3u64 {
        sender.send(id, "sleep", b"10").unwrap();
    }
    sender.flush().unwrap();
    wait_until("the worker to show as holding", SOON, || {
        master.admin("workers").contains("holding")
    });
    // Three times job_timeout: the held jobs never started, so nothing timed out.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        master.workers(),
        workers,
        "the holding worker was not killed"
    );
    assert_eq!(master.log_count("job_timeout"), 0, "{}", master.log_text());
    // Memory is "back" (the limit goes): the jobs run, none failed.
    std::fs::write(env.path().join("jobhost.toml"), config_with(&pool("1MiB"))).unwrap();
    master.signal(nix::sys::signal::Signal::SIGHUP);
    for _ in 0..3 {
        let r = receiver.recv().unwrap();
        assert!(r.is_ok(), "job {} {:?}: {}", r.id, r.status, r.text());
        assert_eq!(r.text(), "slept 10");
    }
}
