//! Hot reload (SIGHUP, `reload`), the shell's half: phase 1, which prepares everything
//! without touching what runs — parse the config, stage each pool's build, probe each new
//! build in a child (loaded, checked, `init`ed: a crash or hang there cannot take the master
//! down), then load the new builds here and `init` the instances of new or changed pools in
//! the master (so their workers share what it builds). Any error ends the reload there:
//! nothing changed, the old generation keeps serving, and the reason ([`ReloadError`]) is
//! logged and shown by `status`.
//!
//! Phase 2, which cannot fail, is the supervisor's (`Supervisor::apply_reload`): it gets a
//! [`ReloadPlan`] — what each pool becomes — and switches the pools over. This module never
//! decides anything about workers or jobs; it owns the probes (fds and child processes) and
//! the plugin instances it hands over.

use std::time::{Instant, SystemTime};

use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::supervisor::{Build, Event, PlanEntry, ReloadPlan, Settings};
use super::token::Token;
use super::Master;
use crate::config::{Config, ConfigError, PoolConfig, PoolMode};
use crate::plugins::{self, PluginError, ProbeRun, Staged};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{key} changed: that takes a restart of the master, not a reload")]
    RestartOnly { key: &'static str },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("pool {pool}: {source}")]
    Pool {
        pool: String,
        #[source]
        source: PluginError,
    },
    #[error("epoll: {0}")]
    Epoll(nix::Error),
    #[error("the master is shutting down")]
    ShuttingDown,
}

/// A reload between its start and its outcome: the new config read, the pools' builds staged,
/// and probe children running `init` for each new or changed pool. The master keeps serving
/// meanwhile — a plugin that hangs in `init` costs its probe, not the master's loop.
pub(super) struct Reloading {
    new: Config,
    pools: Vec<Prep>,
    probes: Vec<Probe>,
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
    verdict: Option<Result<(), PluginError>>,
}

/// The wall-clock time, as `status` shows a reload's.
fn wall_clock() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Master {
    /// `Effect::PrepareReload`: phase 1a — read the config, stage each pool's build, start a
    /// probe per new or changed pool. Nothing that runs is touched. Returns the outcome when
    /// it is known at once (an error, or nothing to probe).
    pub(super) fn begin_reload(&mut self) -> Option<Event<'static>> {
        log::info!("reloading {}", self.config.path.display());
        match self.stage_reload() {
            Ok(reloading) => {
                self.io.reloading = Some(reloading);
                // Nothing to probe: it completes now.
                self.advance_reload()
            }
            Err(error) => Some(Event::ReloadFailed {
                error,
                at: wall_clock(),
            }),
        }
    }

    fn stage_reload(&mut self) -> Result<Reloading, ReloadError> {
        let new = Config::load(&self.config.path)?;
        self.check_restart_only(&new)?;
        let mut pools = Vec::new();
        for cfg in &new.pools {
            let file = cfg.plugin_path(&new.host);
            if !new.host.insecure_plugins_dir {
                plugins::check_trusted(&new.host.plugins_dir, &file)?;
            }
            let staged = self.registry.stage(&file)?;
            let existing = self.sup.pool_named(&cfg.name);
            let keep = existing.is_some_and(|idx| {
                let pool = &self.sup.pools()[idx];
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
            .map_err(|e| ReloadError::Pool {
                pool: prep.cfg.name.clone(),
                source: prep.staged.rename(e),
            })
            .and_then(|run| {
                let token = Token::Probe(probes.len() as u64).encode();
                let watched = match &self.io.epoll {
                    Some(epoll) => epoll.add(run.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token)),
                    None => Err(nix::Error::EBADF),
                };
                match watched {
                    Ok(()) => Ok(run),
                    Err(e) => {
                        run.abandon();
                        Err(ReloadError::Epoll(e))
                    }
                }
            });
            match started {
                Ok(run) => probes.push(Probe {
                    run: Some(run),
                    pool: i,
                    verdict: None,
                }),
                Err(error) => {
                    self.forget_probes(&mut probes);
                    return Err(error);
                }
            }
        }
        Ok(Reloading { new, pools, probes })
    }

    /// Stops watching and kills the probes still running (the master reaps them, and ignores
    /// their exits).
    fn forget_probes(&self, probes: &mut [Probe]) {
        for probe in probes {
            if let Some(run) = probe.run.take() {
                if let Some(epoll) = &self.io.epoll {
                    let _ = epoll.delete(run.fd());
                }
                run.abandon();
            }
        }
    }

    /// A probe's pipe is readable.
    pub(super) fn probe_event(&mut self, index: u64) {
        let Some(probe) = self
            .io
            .reloading
            .as_mut()
            .and_then(|r| r.probes.get_mut(index as usize))
        else {
            return;
        };
        if let Some(run) = &mut probe.run {
            if run.read_report() {
                if let Some(epoll) = &self.io.epoll {
                    let _ = epoll.delete(run.fd());
                }
            }
        }
    }

    /// The master reaped `pid`, which is not a worker: a probe's exit status. True if it was.
    pub(super) fn probe_reaped(&mut self, pid: Pid, status: WaitStatus) -> bool {
        let Some(reloading) = &mut self.io.reloading else {
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
        self.io
            .reloading
            .as_ref()?
            .probes
            .iter()
            .filter_map(|p| p.run.as_ref().map(ProbeRun::deadline))
            .min()
    }

    /// Collects the verdicts of finished (or overdue) probes; once every probe has one (or
    /// one failed), returns the outcome of phase 1. Called on every pass of the loop.
    pub(super) fn advance_reload(&mut self) -> Option<Event<'static>> {
        let reloading = self.io.reloading.as_mut()?;
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
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.delete(run.fd());
            }
            let prep = &reloading.pools[probe.pool];
            probe.verdict = Some(
                run.finish(!done)
                    .map(|_| ())
                    .map_err(|e| prep.staged.rename(e)),
            );
        }
        // The first failure decides; the other probes are not waited for.
        let failed = reloading
            .probes
            .iter()
            .position(|p| matches!(p.verdict, Some(Err(_))));
        let all_in = reloading.probes.iter().all(|p| p.verdict.is_some());
        if failed.is_none() && !all_in {
            return None;
        }
        let mut reloading = self.io.reloading.take()?;
        let outcome = match failed {
            Some(i) => {
                self.forget_probes(&mut reloading.probes);
                let probe = &mut reloading.probes[i];
                let pool = reloading.pools[probe.pool].cfg.name.clone();
                match probe.verdict.take() {
                    Some(Err(source)) => Err(ReloadError::Pool { pool, source }),
                    _ => Err(ReloadError::ShuttingDown), // cannot be: it failed
                }
            }
            None => self.load_reload(reloading),
        };
        Some(match outcome {
            Ok(plan) => Event::ReloadReady(plan),
            Err(error) => Event::ReloadFailed {
                error,
                at: wall_clock(),
            },
        })
    }

    /// `Effect::AbandonReload` (a shutdown while a reload runs): its probes go.
    pub(super) fn abandon_reload(&mut self) -> Event<'static> {
        if let Some(mut reloading) = self.io.reloading.take() {
            self.forget_probes(&mut reloading.probes);
        }
        Event::ReloadFailed {
            error: ReloadError::ShuttingDown,
            at: wall_clock(),
        }
    }

    /// Phase 1b: every probe passed. Load the new builds here and `init` the new and changed
    /// pools in the master; hand the instances over in the plan's order (the supervisor
    /// appends added pools in the same order), and take the new config.
    fn load_reload(&mut self, reloading: Reloading) -> Result<ReloadPlan, ReloadError> {
        let Reloading { new, pools, .. } = reloading;
        let mut entries = Vec::new();
        let mut instances = Vec::new();
        for prep in pools {
            let Prep {
                cfg,
                staged,
                existing,
                keep,
            } = prep;
            if let (true, Some(idx)) = (keep, existing) {
                entries.push(PlanEntry::Keep {
                    pool: idx,
                    config: cfg,
                });
                continue;
            }
            let in_pool = |source| ReloadError::Pool {
                pool: cfg.name.clone(),
                source,
            };
            let loaded = self.registry.commit(&staged).map_err(in_pool)?;
            loaded
                .info
                .check_mode(&staged.source, cfg.mode == PoolMode::Loop)
                .map_err(in_pool)?;
            let instance = loaded
                .library
                .instantiate(&staged.source, &cfg.settings_toml())
                .map_err(in_pool)?;
            let build = Build {
                plugin: loaded.info.name.clone(),
                version: loaded.info.version.clone(),
                hash: loaded.library.hash,
            };
            instances.push((existing, instance));
            entries.push(match existing {
                Some(idx) => PlanEntry::Replace {
                    pool: idx,
                    config: cfg,
                    build,
                },
                None => PlanEntry::Add { config: cfg, build },
            });
        }
        // Nothing failed: from here on the reload happens.
        for (existing, instance) in instances {
            match existing {
                // The old instance is the master's copy; its workers have their own.
                Some(idx) => {
                    if let Some(slot) = self.instances.get_mut(idx) {
                        drop(slot.replace(instance));
                    }
                }
                None => self.instances.push(Some(instance)),
            }
        }
        log::set_max_level(new.host.log_level);
        let settings = Settings {
            graceful_timeout: new.host.graceful_timeout,
            max_payload: new.server.max_payload,
            max_result: new.server.max_result,
        };
        self.config = new;
        Ok(ReloadPlan {
            settings,
            pools: entries,
            at: wall_clock(),
        })
    }

    /// Settings that only a restart of the master can change.
    fn check_restart_only(&self, new: &Config) -> Result<(), ReloadError> {
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
            ("admin.http", old.admin.http != new.admin.http),
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
            Some((key, _)) => Err(ReloadError::RestartOnly { key }),
            None => Ok(()),
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
        && a.redis == b.redis
        && a.gearman == b.gearman
        && (a.redis.is_none()
            || (a.job_timeout == b.job_timeout && a.max_attempts == b.max_attempts))
}
