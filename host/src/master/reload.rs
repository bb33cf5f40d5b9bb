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

use std::time::SystemTime;

use jobhost_plugin_api::PluginInstance;

use super::pool::Pool;
use super::Master;
use crate::admin::ReloadReport;
use crate::config::{Config, PoolConfig, PoolMode};
use crate::plugins::{self, Loaded};

/// What phase 1 decided for one pool of the new config.
enum Plan {
    /// Same build, same worker-side config: keep the workers, update the rest.
    Keep(usize),
    /// New build or new worker-side config: new instance, new workers.
    Replace(usize, PluginInstance, Loaded),
    Add(PluginInstance, Loaded),
}

impl Master {
    /// Runs a reload and records the outcome for `status`. Ok: a summary; Err: why nothing
    /// changed.
    pub(super) fn reload(&mut self) -> Result<String, String> {
        log::info!("reloading {}", self.config.path.display());
        crate::daemon::notify("RELOADING=1");
        let outcome = self.try_reload();
        // Whether or not it worked, the master serves again (systemd waits for this) — if it
        // had said it was ready in the first place.
        if self.ready_notified {
            crate::daemon::notify("READY=1");
        }
        let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        match &outcome {
            Ok(summary) => {
                log::info!("reload ok (generation {}): {summary}", self.generation);
                self.last_reload = Some(ReloadReport {
                    at,
                    ok: true,
                    message: summary.clone(),
                });
            }
            Err(reason) => {
                log::error!("reload failed, nothing changed: {reason}");
                self.last_reload = Some(ReloadReport {
                    at,
                    ok: false,
                    message: reason.clone(),
                });
            }
        }
        outcome
    }

    fn try_reload(&mut self) -> Result<String, String> {
        if !matches!(self.phase, super::Phase::Running) {
            return Err("the master is shutting down".into());
        }
        let new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        self.check_restart_only(&new)?;

        // Phase 1: prepare. Nothing that runs is touched.
        let mut plans = Vec::new();
        for cfg in &new.pools {
            let file = cfg.plugin_path(&new.host);
            if !new.host.insecure_plugins_dir {
                plugins::check_trusted(&new.host.plugins_dir, &file).map_err(|e| e.to_string())?;
            }
            let loaded = self
                .registry
                .load(&file, &[], new.host.init_timeout)
                .map_err(|e| e.to_string())?;
            loaded
                .info
                .check_mode(&file, cfg.mode == PoolMode::Loop)
                .map_err(|e| format!("pool {}: {e}", cfg.name))?;
            let existing = self.pool_index.get(&cfg.name).copied();
            if let Some(idx) = existing {
                let pool = &self.pools[idx];
                if pool.hash == loaded.library.hash && same_for_workers(&pool.config, cfg) {
                    plans.push((cfg.clone(), Plan::Keep(idx)));
                    continue;
                }
            }
            // init in a probe child first, then in the master.
            plugins::probe(
                &loaded.private,
                &[cfg.settings_toml()],
                new.host.init_timeout,
            )
            .map_err(|e| {
                format!("pool {}: {e}", cfg.name).replace(
                    &loaded.private.display().to_string(),
                    &file.display().to_string(),
                )
            })?;
            let instance = loaded
                .library
                .instantiate(&file, &cfg.settings_toml())
                .map_err(|e| format!("pool {}: {e}", cfg.name))?;
            plans.push((
                cfg.clone(),
                match existing {
                    Some(idx) => Plan::Replace(idx, instance, loaded),
                    None => Plan::Add(instance, loaded),
                },
            ));
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

    /// Settings that only a restart of the master can change.
    fn check_restart_only(&self, new: &Config) -> Result<(), String> {
        let old = &self.config;
        let changed = [
            ("server.socket", old.server.socket != new.server.socket),
            (
                "server.socket_mode",
                old.server.socket_mode != new.server.socket_mode,
            ),
            ("admin.socket", old.admin.socket != new.admin.socket),
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
}
