//! `wordcount`: a loop-mode plugin that counts the words of files dropped into a folder.
//!
//! It exists to show loop mode: the plugin fetches its own work in `run_once` and tells the
//! worker whether there was any ([`Step::More`]) or not ([`Step::Idle`]), and several workers
//! share one inbox safely.
//!
//! Settings (both required, both existing folders, not the same one):
//! - `inbox`: where input files appear. Each `run_once` takes one regular file, skipping hidden
//!   (`.name`) files and names ending in `.tmp`, so writers should write `name.tmp` (or
//!   `.name`) and rename it when complete.
//! - `outbox`: where `<filename>.count` is written: the number of whitespace-separated words,
//!   then a newline. It is written to a hidden `.tmp` file and renamed, so readers never see
//!   half a file. The input file is then removed.
//!
//! - `stop_when_empty` (optional, default false): when the inbox is empty, say
//!   [`Step::Stop`] instead of Idle — process a folder once and end the worker (the pool is then
//!   not refilled until restarted).
//!
//! Two workers may pick the same file; whoever finds it gone just moves on (both would write
//! the same count, so the result is right either way).

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind};
use std::path::{Path, PathBuf};

use jobhost_plugin_api::{export_plugin, Modes, Plugin, Settings, Step};

pub struct WordCount {
    inbox: PathBuf,
    outbox: PathBuf,
    stop_when_empty: bool,
}

impl Plugin for WordCount {
    const MODES: Modes = Modes::LOOP;

    fn init(settings: &Settings) -> Result<Self, String> {
        let inbox = folder_setting(settings, "inbox", "the folder to take files from")?;
        let outbox = folder_setting(settings, "outbox", "the folder to write counts to")?;
        let same = match (inbox.canonicalize(), outbox.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => inbox == outbox,
        };
        if same {
            return Err(format!(
                "settings `inbox` and `outbox` are the same folder ({}): counts would be counted",
                inbox.display()
            ));
        }
        let stop_when_empty = settings.get_or("stop_when_empty", false)?;
        Ok(WordCount {
            inbox,
            outbox,
            stop_when_empty,
        })
    }

    fn run_once(&mut self) -> Result<Step, String> {
        match self.next_file()? {
            Some(name) => self.process(name),
            None if self.stop_when_empty => Ok(Step::Stop),
            None => Ok(Step::Idle),
        }
    }
}

impl WordCount {
    /// The name of one eligible file in the inbox, if there is any.
    fn next_file(&self) -> Result<Option<OsString>, String> {
        let entries = fs::read_dir(&self.inbox)
            .map_err(|e| format!("wordcount: cannot list inbox {}: {e}", self.inbox.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                format!("wordcount: cannot list inbox {}: {e}", self.inbox.display())
            })?;
            let name = entry.file_name();
            let bytes = name.as_encoded_bytes();
            if bytes.starts_with(b".") || bytes.ends_with(b".tmp") {
                continue;
            }
            // A file another worker removed meanwhile has no type any more: skip it too.
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Counts `name`'s words, writes the count to the outbox and removes the input.
    fn process(&self, name: OsString) -> Result<Step, String> {
        let input = self.inbox.join(&name);
        let words = match count_words(&input) {
            Ok(words) => words,
            // Another worker took it first.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Step::More),
            Err(e) => return Err(format!("wordcount: cannot read {}: {e}", input.display())),
        };

        let mut out_name = name;
        out_name.push(".count");
        let output = self.outbox.join(&out_name);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(&out_name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = self.outbox.join(tmp_name);
        if let Err(e) =
            fs::write(&tmp, format!("{words}\n")).and_then(|()| fs::rename(&tmp, &output))
        {
            let _ = fs::remove_file(&tmp);
            return Err(format!("wordcount: cannot write {}: {e}", output.display()));
        }

        match fs::remove_file(&input) {
            Ok(()) => {
                log::debug!("wordcount: {}: {words} words", input.display());
                Ok(Step::More)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Step::More),
            Err(e) => Err(format!("wordcount: cannot remove {}: {e}", input.display())),
        }
    }
}

/// The path in setting `key`, which must name an existing folder.
fn folder_setting(settings: &Settings, key: &str, what: &str) -> Result<PathBuf, String> {
    let path: String = settings
        .get(key)?
        .ok_or_else(|| format!("missing setting `{key}` ({what})"))?;
    match fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(PathBuf::from(path)),
        Ok(_) => Err(format!("setting `{key}`: {path} is not a folder")),
        Err(e) => Err(format!("setting `{key}`: cannot use {path}: {e}")),
    }
}

/// The number of whitespace-separated words in the file, read in chunks.
fn count_words(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::new(fs::File::open(path)?);
    let mut words = 0;
    let mut in_word = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(words);
        }
        for &b in chunk {
            let space = b.is_ascii_whitespace();
            if !space && !in_word {
                words += 1;
            }
            in_word = !space;
        }
        let len = chunk.len();
        reader.consume(len);
    }
}

export_plugin!(WordCount);

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    struct Dirs {
        inbox: TempDir,
        outbox: TempDir,
    }

    fn setup() -> (Dirs, WordCount) {
        let dirs = Dirs {
            inbox: TempDir::new().unwrap(),
            outbox: TempDir::new().unwrap(),
        };
        let toml = format!(
            "inbox = {:?}\noutbox = {:?}",
            dirs.inbox.path().to_str().unwrap(),
            dirs.outbox.path().to_str().unwrap()
        );
        let plugin = WordCount::init(&Settings::from_toml(&toml).unwrap()).unwrap();
        (dirs, plugin)
    }

    #[test]
    fn counts_each_file_once_then_idles() {
        let (dirs, mut plugin) = setup();
        let inbox = dirs.inbox.path();
        fs::write(
            inbox.join("a.txt"),
            "hello world\n\tthree  words? no, four\n",
        )
        .unwrap();
        fs::write(inbox.join("empty"), "").unwrap();
        fs::write(inbox.join("half.tmp"), "being written").unwrap();
        fs::write(inbox.join(".hidden"), "being written").unwrap();
        fs::create_dir(inbox.join("sub")).unwrap();

        assert_eq!(plugin.run_once().unwrap(), Step::More);
        assert_eq!(plugin.run_once().unwrap(), Step::More);
        assert_eq!(plugin.run_once().unwrap(), Step::Idle);

        let outbox = dirs.outbox.path();
        assert_eq!(
            fs::read_to_string(outbox.join("a.txt.count")).unwrap(),
            "6\n"
        );
        assert_eq!(
            fs::read_to_string(outbox.join("empty.count")).unwrap(),
            "0\n"
        );
        assert_eq!(
            fs::read_dir(outbox).unwrap().count(),
            2,
            "no temp files left behind"
        );
        assert!(!inbox.join("a.txt").exists() && !inbox.join("empty").exists());
        assert!(inbox.join("half.tmp").exists() && inbox.join(".hidden").exists());
    }

    #[test]
    fn a_file_another_worker_took_is_not_an_error() {
        let (_dirs, plugin) = setup();
        assert_eq!(plugin.process("gone.txt".into()).unwrap(), Step::More);
    }

    #[test]
    fn settings_must_name_two_existing_distinct_folders() {
        let dir = TempDir::new().unwrap();
        let d = dir.path().to_str().unwrap();
        fs::write(dir.path().join("file"), "").unwrap();
        let init = |toml: String| {
            WordCount::init(&Settings::from_toml(&toml).unwrap())
                .err()
                .unwrap()
        };

        let err = init(format!("outbox = {d:?}"));
        assert!(err.contains("missing setting `inbox`"), "{err}");
        let err = init(format!("inbox = {d:?}"));
        assert!(err.contains("missing setting `outbox`"), "{err}");
        let err = init(format!("inbox = {d:?}\noutbox = '{d}/file'"));
        assert!(
            err.contains("`outbox`") && err.contains("is not a folder"),
            "{err}"
        );
        let err = init(format!("inbox = '{d}/nope'\noutbox = {d:?}"));
        assert!(err.contains("`inbox`") && err.contains("nope"), "{err}");
        let err = init(format!("inbox = {d:?}\noutbox = '{d}/.'"));
        assert!(err.contains("same folder"), "{err}");
    }

    #[test]
    fn is_loop_mode_only() {
        let (_dirs, mut plugin) = setup();
        assert_eq!(WordCount::MODES, Modes::LOOP);
        assert!(plugin.handle(b"x").is_err());
    }
}
