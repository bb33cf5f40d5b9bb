//! Hot reload (SIGHUP, `reload`): re-read the config, load new or changed plugin builds, and
//! switch the pools over — all or nothing.
//!
//! Phase 1 prepares everything without touching what runs: parse the config, load each pool's
//! build (a new build is probed in a child: loaded, checked, `init`ed — a crash or hang there
//! cannot take the master down), `init` the instances of new or changed pools in the master.
//! Any error ends the reload there: nothing changed, the old generation keeps serving, and the
//! reason is logged and shown by `status`. Phase 2 cannot fail: unchanged pools keep their
//! workers; changed pools get the new instance, their old workers finish their job and leave
//! while new-generation workers take over the queue; removed pools drain their queue and stop;
//! added pools start. Private copies no worker uses any more are then deleted from disk (the
//! code stays mapped in the master: abi_stable never unloads a library).

use std::time::{Instant, SystemTime};

use jobhost_plugin_api::PluginInstance;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::pool::Pool;
use super::Master;
use crate::admin::ReloadReport;
use crate::config::{Config, PoolConfig, PoolMode};
use crate::plugins::{self, Loaded, ProbeRun, Staged};

/// A reload between its start and its outcome: the new config read, the pools' builds staged,
/// and probe children running `init` for each new or changed pool. The master keeps serving
/// meanwhile — a plugin that hangs in `init` costs its probe, not the master's loop.
pub(super) struct Reloading {
    new: Config,
    pools: Vec<Prep>,
    probes: Vec<Probe>,
    /// Admin sessions waiting for the outcome (SIGHUP waits for nobody).
    waiters: Vec<u64>,
}

/// One pool of the new config on its way in.
struct Prep {
    cfg: PoolConfig,
    staged: Staged,
    /// Its index among the current pools, if it exists there.
    existing: Option<usize>,
    /// Same build and worker-side config as now: its workers stay.
    keep: bool,
}

struct Probe {
    /// Running; `None` once its verdict is in.
    run: Option<ProbeRun>,
    /// The pool (index in `Reloading::pools`) whose `init` it tries.
    pool: usize,
    verdict: Option<Result<(), String>>,
}

/// What phase 1 decided for one pool of the new config.
enum Plan {
    /// Same build, same worker-side config: keep the workers, update the rest.
    Keep(usize),
    /// New build or new worker-side config: new instance, new workers.
    Replace(usize, PluginInstance, Loaded),
    Add(PluginInstance, Loaded),
}

impl Master {
    /// SIGHUP or `reload`: starts a reload, or — while one runs — queues another, so the config
    /// as it is now is what gets loaded. `waiter`: an admin session to answer with the outcome.
    pub(super) fn request_reload(&mut self, waiter: Option<u64>) {
        if self.reloading.is_some() {
            let next = self.next_reload.get_or_insert_with(Vec::new);
            next.extend(waiter);
            return;
        }
        log::info!("reloading {}", self.config.path.display());
        crate::daemon::notify("RELOADING=1");
        let waiters: Vec<u64> = waiter.into_iter().collect();
        match self.begin_reload() {
            Ok(reloading) => {
                self.reloading = Some(Reloading {
                    waiters,
                    ..reloading
                });
                // Nothing to probe: it completes on this pass of the loop.
                self.advance_reload();
            }
            Err(reason) => self.reload_done(Err(reason), waiters),
        }
    }

    /// Phase 1a: read the config, stage each pool's build, start a probe per new or changed
    /// pool. Nothing that runs is touched.
    fn begin_reload(&mut self) -> Result<Reloading, String> {
        if !matches!(self.phase, super::Phase::Running) {
            return Err("the master is shutting down".into());
        }
        let new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        self.check_restart_only(&new)?;
        let mut pools = Vec::new();
        for cfg in &new.pools {
            let file = cfg.plugin_path(&new.host);
            if !new.host.insecure_plugins_dir {
                plugins::check_trusted(&new.host.plugins_dir, &file).map_err(|e| e.to_string())?;
            }
            let staged = self.registry.stage(&file).map_err(|e| e.to_string())?;
            let existing = self.pool_index.get(&cfg.name).copied();
            let keep = existing.is_some_and(|idx| {
                let pool = &self.pools[idx];
                pool.hash == staged.hash && same_for_workers(&pool.config, cfg)
            });
            pools.push(Prep {
                cfg: cfg.clone(),
                staged,
                existing,
                keep,
            });
        }
        let mut probes: Vec<Probe> = Vec::new();
        for (i, prep) in pools.iter().enumerate().filter(|(_, p)| !p.keep) {
            let started = ProbeRun::start(
                &prep.staged.private,
                &[prep.cfg.settings_toml()],
                new.host.init_timeout,
            )
            .map_err(|e| format!("pool {}: {}", prep.cfg.name, prep.staged.rename(e)))
            .and_then(|run| {
                let token = super::token::Token::Probe(probes.len() as u64).encode();
                let watched = self
                    .epoll()
                    .add(run.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token));
                match watched {
                    Ok(()) => Ok(run),
                    Err(e) => {
                        run.abandon();
                        Err(format!("epoll: {e}"))
                    }
                }
            });
            match started {
                Ok(run) => probes.push(Probe {
                    run: Some(run),
                    pool: i,
                    verdict: None,
                }),
                Err(reason) => {
                    self.forget_probes(&mut probes);
                    return Err(reason);
                }
            }
        }
        Ok(Reloading {
            new,
            pools,
            probes,
            waiters: Vec::new(),
        })
    }

    /// Stops watching and kills the probes still running (the master reaps them, and ignores
    /// their exits).
    fn forget_probes(&self, probes: &mut [Probe]) {
        for probe in probes {
            if let Some(run) = probe.run.take() {
                if let Some(epoll) = &self.epoll {
                    let _ = epoll.delete(run.fd());
                }
                run.abandon();
            }
        }
    }

    /// A probe's pipe is readable.
    pub(super) fn probe_event(&mut self, index: u64) {
        let Some(probe) = self
            .reloading
            .as_mut()
            .and_then(|r| r.probes.get_mut(index as usize))
        else {
            return;
        };
        if let Some(run) = &mut probe.run {
            if run.read_report() {
                if let Some(epoll) = &self.epoll {
                    let _ = epoll.delete(run.fd());
                }
            }
        }
    }

    /// The master reaped `pid`, which is not a worker: a probe's exit status. True if it was.
    pub(super) fn probe_reaped(&mut self, pid: Pid, status: WaitStatus) -> bool {
        let Some(reloading) = &mut self.reloading else {
            return false;
        };
        for probe in &mut reloading.probes {
            if let Some(run) = &mut probe.run {
                if run.pid() == pid {
                    run.reaped(status);
                    return true;
                }
            }
        }
        false
    }

    /// The earliest probe deadline, for the loop's wait.
    pub(super) fn probe_deadline(&self) -> Option<Instant> {
        self.reloading
            .as_ref()?
            .probes
            .iter()
            .filter_map(|p| p.run.as_ref().map(ProbeRun::deadline))
            .min()
    }

    /// Collects the verdicts of finished (or overdue) probes; once every probe has one,
    /// completes the reload. Called on every pass of the master's loop.
    pub(super) fn advance_reload(&mut self) {
        let Some(reloading) = &mut self.reloading else {
            return;
        };
        let now = Instant::now();
        for probe in &mut reloading.probes {
            let Some(run) = &probe.run else { continue };
            let done = run.is_done();
            if !done && now < run.deadline() {
                continue;
            }
            let Some(run) = probe.run.take() else {
                continue;
            };
            if let Some(epoll) = &self.epoll {
                let _ = epoll.delete(run.fd());
            }
            let prep = &reloading.pools[probe.pool];
            probe.verdict = Some(
                run.finish(!done)
                    .map(|_| ())
                    .map_err(|e| format!("pool {}: {}", prep.cfg.name, prep.staged.rename(e))),
            );
        }
        // The first failure decides; the other probes are not waited for.
        let failed = reloading
            .probes
            .iter()
            .find_map(|p| p.verdict.as_ref().and_then(|v| v.clone().err()));
        let all_in = reloading.probes.iter().all(|p| p.verdict.is_some());
        if failed.is_none() && !all_in {
            return;
        }
        let Some(mut reloading) = self.reloading.take() else {
            return;
        };
        let waiters = std::mem::take(&mut reloading.waiters);
        let outcome = match failed {
            Some(reason) => {
                self.forget_probes(&mut reloading.probes);
                Err(reason)
            }
            None => self.complete_reload(reloading),
        };
        self.reload_done(outcome, waiters);
        if let Some(next) = self.next_reload.take() {
            // Asked again meanwhile: load the config as it is now.
            self.request_reload(None);
            if let Some(reloading) = &mut self.reloading {
                reloading.waiters.extend(next);
            } else if let Some(last) = &self.last_reload {
                let reply = reload_reply(last);
                for id in next {
                    self.answer_admin(id, &reply);
                }
            }
        }
    }

    /// Records the outcome for `status`, logs it, tells systemd and the waiting sessions.
    fn reload_done(&mut self, outcome: Result<String, String>, waiters: Vec<u64>) {
        // Whether or not it worked, the master serves again (systemd waits for this) — if it
        // had said it was ready in the first place.
        if self.ready_notified {
            crate::daemon::notify("READY=1");
        }
        let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let report = match outcome {
            Ok(summary) => {
                log::info!("reload ok (generation {}): {summary}", self.generation);
                ReloadReport {
                    at,
                    ok: true,
                    message: summary,
                }
            }
            Err(reason) => {
                log::error!("reload failed, nothing changed: {reason}");
                ReloadReport {
                    at,
                    ok: false,
                    message: reason,
                }
            }
        };
        let reply = reload_reply(&report);
        self.last_reload = Some(report);
        for id in waiters {
            self.answer_admin(id, &reply);
        }
    }

    /// Phase 1b and 2: every probe passed. Load the new builds here, `init` the new and changed
    /// pools in the master (so their workers share what it builds), then switch over.
    fn complete_reload(&mut self, reloading: Reloading) -> Result<String, String> {
        if !matches!(self.phase, super::Phase::Running) {
            return Err("the master is shutting down".into());
        }
        let Reloading { new, pools, .. } = reloading;
        let mut plans = Vec::new();
        for prep in pools {
            let Prep {
                cfg,
                staged,
                existing,
                keep,
            } = prep;
            if let (true, Some(idx)) = (keep, existing) {
                plans.push((cfg, Plan::Keep(idx)));
                continue;
            }
            let loaded = self
                .registry
                .commit(&staged)
                .map_err(|e| format!("pool {}: {e}", cfg.name))?;
            loaded
                .info
                .check_mode(&staged.source, cfg.mode == PoolMode::Loop)
                .map_err(|e| format!("pool {}: {e}", cfg.name))?;
            let instance = loaded
                .library
                .instantiate(&staged.source, &cfg.settings_toml())
                .map_err(|e| format!("pool {}: {e}", cfg.name))?;
            let plan = match existing {
                Some(idx) => Plan::Replace(idx, instance, loaded),
                None => Plan::Add(instance, loaded),
            };
            plans.push((cfg, plan));
        }

        // Phase 2: apply. Nothing here can fail.
        self.generation += 1;
        let generation = self.generation;
        let (mut kept, mut replaced, mut added) = (Vec::new(), Vec::new(), Vec::new());
        let mut still_here = Vec::new();
        for (cfg, plan) in plans {
            let name = cfg.name.clone();
            match plan {
                Plan::Keep(idx) => {
                    let pool = &mut self.pools[idx];
                    pool.wanted = cfg.workers;
                    pool.config = cfg;
                    self.trim_pool(idx);
                    still_here.push(idx);
                    kept.push(name);
                }
                Plan::Replace(idx, instance, loaded) => {
                    let pool = &mut self.pools[idx];
                    // The old instance is the master's copy; its workers have their own.
                    drop(pool.instance.replace(instance));
                    pool.hash = loaded.library.hash;
                    pool.plugin = loaded.info.name.clone();
                    pool.plugin_version = loaded.info.version.clone();
                    pool.wanted = cfg.workers;
                    pool.config = cfg;
                    pool.stopped = false;
                    pool.backoff.reset();
                    self.retire_workers_of(idx, generation);
                    still_here.push(idx);
                    replaced.push(format!(
                        "{name} ({} {})",
                        loaded.info.name, loaded.info.version
                    ));
                }
                Plan::Add(instance, loaded) => {
                    self.pools
                        .push(Pool::new(cfg, instance, &loaded.info, loaded.library.hash));
                    let idx = self.pools.len() - 1;
                    self.pool_index.insert(name.clone(), idx);
                    still_here.push(idx);
                    added.push(name);
                }
            }
        }
        // Pools no longer in the config: no new jobs; they drain their queue, then stop.
        let mut removed = Vec::new();
        for idx in 0..self.pools.len() {
            if !still_here.contains(&idx) && !self.pools[idx].retiring {
                self.pools[idx].retiring = true;
                let name = self.pools[idx].config.name.clone();
                if self.pools[idx].stopped {
                    // Stopped by an operator: its queue will not run; answer it now.
                    let reason = format!("pool {name} was removed from the config while stopped");
                    while let Some(key) = self.pools[idx].queue.pop_front() {
                        self.answer(key, crate::protocol::Status::Failed, reason.as_bytes());
                    }
                }
                removed.push(name);
            }
        }
        self.pool_index = still_here
            .iter()
            .map(|&i| (self.pools[i].config.name.clone(), i))
            .collect();
        log::set_max_level(new.host.log_level);
        self.config = new;
        self.delete_unused_copies();
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        Ok(format!(
            "generation {generation}: kept {}; replaced {}; added {}; removed {}",
            list(&kept),
            list(&replaced),
            list(&added),
            list(&removed)
        ))
    }

    /// A shutdown while a reload runs: its probes go, its waiters hear why.
    pub(super) fn abandon_reload(&mut self) {
        if let Some(mut reloading) = self.reloading.take() {
            self.forget_probes(&mut reloading.probes);
            let mut waiters = std::mem::take(&mut reloading.waiters);
            waiters.extend(self.next_reload.take().unwrap_or_default());
            self.reload_done(Err("the master is shutting down".into()), waiters);
        }
    }

    /// Settings that only a restart of the master can change.
    fn check_restart_only(&self, new: &Config) -> Result<(), String> {
        let old = &self.config;
        let changed = [
            ("server.socket", old.server.socket != new.server.socket),
            (
                "server.socket_mode",
                old.server.socket_mode != new.server.socket_mode,
            ),
            (
                "server.socket_group",
                old.server.socket_group != new.server.socket_group,
            ),
            ("admin.socket", old.admin.socket != new.admin.socket),
            (
                "admin.socket_mode",
                old.admin.socket_mode != new.admin.socket_mode,
            ),
            (
                "admin.socket_group",
                old.admin.socket_group != new.admin.socket_group,
            ),
            ("admin.tcp", old.admin.tcp != new.admin.tcp),
            (
                "admin.token_file",
                old.admin.token_file != new.admin.token_file,
            ),
            (
                "host.runtime_dir",
                old.host.runtime_dir != new.host.runtime_dir,
            ),
            ("host.log", old.host.log != new.host.log),
            (
                "host.insecure_plugins_dir",
                old.host.insecure_plugins_dir != new.host.insecure_plugins_dir,
            ),
            ("host.user", old.host.user != new.host.user),
            ("host.group", old.host.group != new.host.group),
        ];
        match changed.iter().find(|(_, c)| *c) {
            Some((key, _)) => Err(format!(
                "{key} changed: that takes a restart of the master, not a reload"
            )),
            None => Ok(()),
        }
    }

    /// Asks every worker of pool `idx` older than `generation` to finish its job and leave; the
    /// pool's wanted count then forks new-generation workers at once.
    fn retire_workers_of(&mut self, idx: usize, generation: u64) {
        let deadline = std::time::Instant::now() + self.config.host.graceful_timeout;
        let old: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.pool == idx && w.generation < generation)
            .map(|w| w.id)
            .collect();
        for id in old {
            self.stop_worker(id, deadline);
        }
    }

    /// Retiring pools: once nothing is queued or in flight, their workers go. Jobs that come
    /// back to the queue afterwards (a worker died) bring a worker back to finish them.
    pub(super) fn retire_pools(&mut self) {
        for idx in 0..self.pools.len() {
            let pool = &self.pools[idx];
            if !pool.retiring {
                continue;
            }
            let in_flight = self
                .workers
                .values()
                .any(|w| w.pool == idx && !w.in_flight.is_empty());
            let drained = pool.queue.is_empty() && !in_flight;
            if drained && pool.wanted == 0 && pool.instance.is_some() {
                if !self.workers.values().any(|w| w.pool == idx) {
                    // Gone for good: free what its init built in the master (the build stays
                    // mapped; its private copy is deleted once unused).
                    log::info!(
                        "pool {} (removed from the config) is gone",
                        pool.config.name
                    );
                    self.pools[idx].instance = None;
                }
            } else if drained && pool.wanted > 0 {
                log::info!(
                    "pool {} (removed from the config) has drained; stopping its workers",
                    pool.config.name
                );
                self.pools[idx].wanted = 0;
                self.trim_pool(idx);
            } else if !pool.queue.is_empty() && pool.wanted == 0 {
                self.pools[idx].wanted = pool.config.workers.max(1);
            }
        }
    }

    /// Deletes the private copies of builds that no pool and no live worker uses.
    pub(super) fn delete_unused_copies(&mut self) {
        let mut in_use: Vec<_> = self
            .pools
            .iter()
            .filter(|p| !p.retiring || p.wanted > 0)
            .map(|p| p.hash)
            .collect();
        in_use.extend(self.workers.values().map(|w| w.hash));
        for path in self.registry.delete_unused(&in_use) {
            log::info!(
                "deleted private plugin copy {} (no worker uses it; it stays mapped in the master)",
                path.display()
            );
        }
    }
}

/// The admin reply to `reload`.
fn reload_reply(report: &ReloadReport) -> String {
    if report.ok {
        format!("{}\nOK\n", report.message)
    } else {
        crate::admin::err_reply(&format!(
            "reload failed, nothing changed: {}",
            report.message
        ))
    }
}

/// True when a worker forked with `a` would behave exactly like one forked with `b`: same
/// plugin settings and mode and the same worker-side limits.
fn same_for_workers(a: &PoolConfig, b: &PoolConfig) -> bool {
    a.plugin == b.plugin
        && a.mode == b.mode
        && a.settings == b.settings
        && a.idle_sleep == b.idle_sleep
        && a.max_jobs == b.max_jobs
        && a.max_lifetime == b.max_lifetime
        && a.max_rss == b.max_rss
        && a.min_available_memory == b.min_available_memory
        && a.redis == b.redis
        && (a.redis.is_none()
            || (a.job_timeout == b.job_timeout && a.max_attempts == b.max_attempts))
}
