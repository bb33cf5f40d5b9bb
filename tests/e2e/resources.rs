//! What a running master costs: no CPU while idle, and preloaded data shared by every worker.

use std::time::Duration;

use jobhost_e2e::{config_with, cpu_ticks, Env};
use nix::unistd::Pid;

#[test]
fn an_idle_master_and_idle_workers_use_no_cpu() {
    let env = Env::new();
    env.install("echo");
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\nmax_lifetime = \"1h\"\n\n[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 2\nmin_available_memory = \"1MiB\"\nmax_rss = \"1GiB\"\n",
    ));
    let workers = master.wait_for_workers(4);
    assert_eq!(
        master.client().call("echo", b"warm up").unwrap().body,
        b"warm up"
    );
    let mut pids = workers.clone();
    pids.push(master.pid());
    let total = || -> u64 { pids.iter().map(|p| cpu_ticks(*p)).sum() };
    let before = total();
    std::thread::sleep(Duration::from_secs(3));
    let used = total().saturating_sub(before);
    // 5 processes × 3 s; a busy loop anywhere would be hundreds of ticks.
    assert!(used <= 3, "idle processes used {used} clock ticks in 3 s");
}

#[test]
fn a_table_built_in_init_is_shared_by_every_worker() {
    const TABLE_MIB: u64 = 256;
    let env = Env::new();
    env.install("lookup");
    let master = env.start_master(&config_with(&format!(
        "[[pool]]\nname = \"l\"\nplugin = \"lookup\"\nworkers = 4\n[pool.settings]\ntable_mib = {TABLE_MIB}\n"
    )));
    let workers = master.wait_for_workers(4);
    let mut client = master.client();
    // Every worker reads the table (least-loaded dispatch spreads these over all four).
    for i in 0..400u64 {
        client.send(i, "l", i.to_string().as_bytes()).unwrap();
    }
    for _ in 0..400 {
        assert!(client.recv().unwrap().is_ok());
    }
    let mut pss_mib = Vec::new();
    for pid in std::iter::once(master.pid()).chain(workers) {
        pss_mib.push(jobhost::sys::pss_of(Pid::from_raw(pid)).unwrap() as f64 / (1 << 20) as f64);
    }
    let total: f64 = pss_mib.iter().sum();
    let limit = 1.25 * TABLE_MIB as f64 + 4.0 * pss_mib.len() as f64;
    eprintln!("PSS MiB master + 4 workers: {pss_mib:.1?}, total {total:.1} (limit {limit:.1})");
    assert!(
        total < limit,
        "summed PSS {total:.1} MiB ≥ {limit:.1} MiB: the table is not shared"
    );
    // And the table is really there: each process maps it.
    assert!(
        total > TABLE_MIB as f64 * 0.9,
        "total PSS {total:.1} MiB: where is the table?"
    );
}
