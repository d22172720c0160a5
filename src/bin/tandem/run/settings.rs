//! `tandem run`'s settings: `tandem.toml` (or `--config FILE`), the chosen
//! `[env.NAME]`, then the flags on top, checked and resolved into one
//! [`Spec`] that the master hands to every child (so a reload runs what the
//! master resolved at start, whatever happened to the file since).
//!
//! Every mistake here is a usage error (exit code 2) that names what to fix.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem::cluster::{ListenAddr, MAX_WORKERS};

use super::RunArgs;

/// The settings file read when `--config` is not given, from the working directory.
pub const DEFAULT_FILE: &str = "tandem.toml";

/// How long a program may take to report ready, when not set. See `docs/run.md`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a program may take to exit after SIGTERM, when not set.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A usage error: the message names the setting and what to do.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage<T>(message: impl Into<String>) -> Result<T, Usage> {
    Err(Usage(message.into()))
}

/// When a worker's program counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ready {
    /// When it sends `READY=1` on `NOTIFY_SOCKET`; none within the ready
    /// timeout is a failed start.
    Notify,
    /// This long after it started, if it still runs (or at `READY=1`, if sooner).
    After(Duration),
}

/// Where the agent's Leader gets its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upstream {
    /// A registry the master runs itself, on this address, seeded with these keys.
    Embedded { address: String, put: Vec<(String, String)> },
    /// The bundled registry at this address.
    Registry(String),
    /// etcd, at these comma-separated endpoints.
    Etcd(String),
    /// Redis, at this URL.
    Redis(String),
}

/// One listener, as the master binds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    pub name: String,
    pub address: String,
    /// `reuseport` or `shared`.
    pub mode: String,
}

/// Everything a `tandem run` cluster runs with, resolved once by the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub workers: usize,
    pub listeners: Vec<Listen>,
    pub upstream: Upstream,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The program's environment on top of tandem's own (the base `[env]`,
    /// then the chosen `[env.NAME]`).
    pub env: Vec<(String, String)>,
    pub subscribe: Vec<String>,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    pub max_memory_mib: Option<u64>,
    pub metrics: Option<std::net::SocketAddr>,
}

/// `tandem.toml`, as written: every key optional, an unknown one an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Option<String>,
    workers: Option<usize>,
    command: Option<Vec<String>>,
    listen: Option<Vec<FileListen>>,
    upstream: Option<FileUpstream>,
    subscribe: Option<Vec<String>>,
    ready: Option<String>,
    ready_timeout: Option<String>,
    stop_timeout: Option<String>,
    max_memory: Option<u64>,
    metrics: Option<String>,
    env: Option<BTreeMap<String, EnvEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    name: Option<String>,
    address: String,
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    registry: Option<String>,
    etcd: Option<String>,
    redis: Option<String>,
    put: Option<BTreeMap<String, String>>,
}

/// `[env]`: `KEY = "value"` for every environment, `[env.NAME]` tables for one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EnvEntry {
    Value(String),
    Environment(BTreeMap<String, String>),
}

/// Reads the settings file: `--config FILE` (which must exist), else
/// `./tandem.toml` when there is one.
fn read_file(config: Option<&Path>) -> Result<(File, Option<PathBuf>), Usage> {
    let path = match config {
        Some(path) => path.to_owned(),
        None => {
            let path = PathBuf::from(DEFAULT_FILE);
            if !path.exists() {
                return Ok((File::default(), None));
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))?;
    let file = toml::from_str(&text).map_err(|e| Usage(format!("{}: {}", path.display(), e.to_string().trim())))?;
    Ok((file, Some(path)))
}

/// Parses `30s`, `500ms` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like \"30s\" or \"500ms\""))?;
    match unit.trim() {
        "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("{text:?}: the unit must be s or ms")),
    }
}

/// Parses `notify` or a duration (ready that long after the start).
pub fn parse_ready(text: &str) -> Result<Ready, String> {
    match text.trim() {
        "notify" => Ok(Ready::Notify),
        other => parse_duration(other)
            .map(Ready::After)
            .map_err(|e| format!("{e}; `ready` is `notify` (wait for READY=1) or a delay such as \"2s\"")),
    }
}

/// Resolves the file and the flags into a checked [`Spec`]. The embedded
/// registry's address is filled in by the caller (`address` empty here).
pub fn resolve(args: &RunArgs) -> Result<Spec, Usage> {
    let (file, path) = read_file(args.config.as_deref())?;
    let from = path.map_or_else(|| "the command line".to_owned(), |p| p.display().to_string());

    let command = if args.command.is_empty() { file.command.clone().unwrap_or_default() } else { args.command.clone() };
    if command.is_empty() {
        return usage(
            "no program to run: give it after `--` (tandem run [OPTIONS] -- PROGRAM [ARGS...]) \
             or as `command = [\"PROGRAM\", ...]` in tandem.toml",
        );
    }
    let workers = args.workers.or(file.workers).unwrap_or_else(tandem::cluster::default_workers);
    if workers == 0 {
        return usage("--workers 0: a cluster needs at least one worker (leave it out for one per CPU)");
    }
    if workers > MAX_WORKERS as usize {
        return usage(format!("--workers {workers}: at most {MAX_WORKERS}"));
    }
    let name = match args.name.clone().or(file.name.clone()) {
        Some(name) => name,
        None => default_name(&command),
    };
    tandem::cluster::control::validate_name(&name).map_err(|e| Usage(format!("--name: {e}")))?;

    let listeners = if args.listen.is_empty() {
        file.listen.unwrap_or_default().into_iter().map(|l| (l.name, l.address, l.mode)).collect::<Vec<_>>()
    } else {
        args.listen.iter().map(|l| split_listen(l)).collect()
    };
    let listeners = check_listeners(listeners)?;

    let upstream = upstream(args, file.upstream.unwrap_or_default())?;
    let subscribe = if args.subscribe.is_empty() { file.subscribe.unwrap_or_default() } else { args.subscribe.clone() };
    let max_key = tandem::registry::Config::default().max_key_size;
    for key in &subscribe {
        if key.is_empty() || key.len() > max_key || key.contains(',') {
            return usage(format!("--subscribe {key:?}: a key has 1 to {max_key} bytes and no ','"));
        }
    }

    let ready = match (&args.ready, &file.ready) {
        (Some(ready), _) => *ready,
        (None, Some(text)) => parse_ready(text).map_err(|e| Usage(format!("{from}: ready: {e}")))?,
        (None, None) => Ready::Notify,
    };
    let duration = |flag: Option<Duration>, text: &Option<String>, key: &str, default: Duration| match (flag, text) {
        (Some(d), _) => Ok(d),
        (None, Some(text)) => parse_duration(text).map_err(|e| Usage(format!("{from}: {key}: {e}"))),
        (None, None) => Ok(default),
    };
    let ready_timeout = duration(args.ready_timeout, &file.ready_timeout, "ready_timeout", DEFAULT_READY_TIMEOUT)?;
    let stop_timeout = duration(args.stop_timeout, &file.stop_timeout, "stop_timeout", DEFAULT_STOP_TIMEOUT)?;
    if ready_timeout.is_zero() {
        return usage("the ready timeout must be above 0");
    }
    if let Ready::After(delay) = ready
        && delay >= ready_timeout
    {
        return usage(format!("ready {delay:?} is not under the ready timeout {ready_timeout:?}"));
    }
    let metrics = match (args.metrics, &file.metrics) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => {
            Some(text.parse().map_err(|e| Usage(format!("{from}: metrics: {text:?} is not host:port ({e})")))?)
        }
        (None, None) => None,
    };
    let env = environment(file.env.unwrap_or_default(), args.env.as_deref(), &from)?;
    check_program(&command[0], &env)?;
    Ok(Spec {
        name,
        workers,
        listeners,
        upstream,
        command,
        env,
        subscribe,
        ready,
        ready_timeout,
        stop_timeout,
        max_memory_mib: args.max_memory.or(file.max_memory),
        metrics,
    })
}

/// `node app.js` is `app`; a program without a script argument is its own file name.
fn default_name(command: &[String]) -> String {
    let script = command.get(1).filter(|a| !a.starts_with('-')).unwrap_or(&command[0]);
    let stem = Path::new(script).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String = stem.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).collect();
    let name = name.trim_start_matches('.');
    if name.is_empty() { "tandem-run".to_owned() } else { name.chars().take(64).collect() }
}

/// `NAME=ADDR` or `ADDR`.
fn split_listen(flag: &str) -> (Option<String>, String, Option<String>) {
    match flag.split_once('=') {
        Some((name, addr)) => (Some(name.to_owned()), addr.to_owned(), None),
        None => (None, flag.to_owned(), None),
    }
}

fn check_listeners(listeners: Vec<(Option<String>, String, Option<String>)>) -> Result<Vec<Listen>, Usage> {
    let mut out: Vec<Listen> = Vec::new();
    for (i, (name, address, mode)) in listeners.into_iter().enumerate() {
        let name = name.unwrap_or_else(|| format!("listen{i}"));
        if name.is_empty()
            || name.len() > 255
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return usage(format!(
                "listener name {name:?}: 1 to 255 ASCII letters, digits, '.', '_' or '-' (it goes into LISTEN_FDNAMES)"
            ));
        }
        if out.iter().any(|l| l.name == name) {
            return usage(format!("two listeners are named {name:?}"));
        }
        let addr = ListenAddr::parse(&address).map_err(|e| Usage(format!("listener {name}: {e}")))?;
        let mode = match mode.as_deref() {
            None => tandem::cluster::ShareMode::default_for(&addr).to_string(),
            Some(m @ ("reuseport" | "shared")) => m.to_owned(),
            Some("round-robin") => {
                return usage(format!(
                    "listener {name}: round-robin needs tandem's own accept loop in the worker; \
                     `tandem run` hands the socket itself to the program: use reuseport or shared"
                ));
            }
            Some(other) => return usage(format!("listener {name}: mode {other:?}: use reuseport or shared")),
        };
        out.push(Listen { name, address, mode });
    }
    Ok(out)
}

fn upstream(args: &RunArgs, file: FileUpstream) -> Result<Upstream, Usage> {
    let flag = [
        args.registry.clone().map(Upstream::Registry),
        args.etcd.clone().map(Upstream::Etcd),
        args.redis.clone().map(Upstream::Redis),
    ]
    .into_iter()
    .flatten()
    .next();
    let from_file: Vec<Upstream> =
        [file.registry.map(Upstream::Registry), file.etcd.map(Upstream::Etcd), file.redis.map(Upstream::Redis)]
            .into_iter()
            .flatten()
            .collect();
    if flag.is_none() && from_file.len() > 1 {
        return usage("[upstream]: give one of registry, etcd and redis");
    }
    let mut put: BTreeMap<String, String> = file.put.unwrap_or_default();
    for pair in &args.put {
        let Some((key, value)) = pair.split_once('=') else {
            return usage(format!("--put {pair:?}: expected KEY=VALUE"));
        };
        put.insert(key.to_owned(), value.to_owned());
    }
    let chosen = flag.or_else(|| from_file.into_iter().next());
    if chosen.is_some() && !put.is_empty() {
        return usage("`put` seeds the embedded registry: it cannot be used with --registry, --etcd or --redis");
    }
    match chosen {
        Some(Upstream::Etcd(_)) if !cfg!(feature = "etcd") => {
            usage("--etcd needs the etcd adapter, which this build lacks: cargo install tandem --features cli,etcd")
        }
        Some(Upstream::Redis(_)) if !cfg!(feature = "redis") => {
            usage("--redis needs the Redis adapter, which this build lacks: cargo install tandem --features cli,redis")
        }
        Some(chosen) => Ok(chosen),
        None => Ok(Upstream::Embedded { address: String::new(), put: put.into_iter().collect() }),
    }
}

/// The base `[env]` entries, then `[env.NAME]`'s.
fn environment(
    entries: BTreeMap<String, EnvEntry>,
    chosen: Option<&str>,
    from: &str,
) -> Result<Vec<(String, String)>, Usage> {
    let mut env = Vec::new();
    let mut environments = BTreeMap::new();
    for (key, entry) in entries {
        match entry {
            EnvEntry::Value(value) => env.push((key, value)),
            EnvEntry::Environment(table) => {
                environments.insert(key, table);
            }
        }
    }
    if let Some(chosen) = chosen {
        let Some(table) = environments.remove(chosen) else {
            let known: Vec<&String> = environments.keys().collect();
            return usage(format!(
                "--env {chosen}: {from} has no [env.{chosen}] table{}",
                if known.is_empty() { String::new() } else { format!(" (it has: {known:?})") }
            ));
        };
        env.retain(|(key, _)| !table.contains_key(key));
        env.extend(table);
    }
    for (key, value) in &env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return usage(format!("env {key:?}: a name is not empty and holds no '=' or NUL, a value no NUL"));
        }
    }
    Ok(env)
}

/// The program must be there and executable: a path (with a `/`) as it is,
/// a bare name through `PATH` (the program's own, when `[env]` sets it).
fn check_program(program: &str, env: &[(String, String)]) -> Result<(), Usage> {
    if program.contains('/') {
        return check_executable(Path::new(program)).map_err(Usage);
    }
    let path = env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| value.clone())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let mut found_unusable = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if candidate.exists() {
            match check_executable(&candidate) {
                Ok(()) => return Ok(()),
                Err(why) => found_unusable = Some(why),
            }
        }
    }
    match found_unusable {
        Some(why) => usage(why),
        None => usage(format!("program {program:?} not found in PATH ({path})")),
    }
}

fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("program {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("program {} is not a file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(format!(
            "program {} is not executable (mode {:o}): chmod +x it, or run it through its interpreter",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_ready_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_ready("notify"), Ok(Ready::Notify));
        assert_eq!(parse_ready("2s"), Ok(Ready::After(Duration::from_secs(2))));
        assert!(parse_ready("soon").is_err());
    }

    #[test]
    fn the_default_name_is_the_script() {
        let name = |c: &[&str]| default_name(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(name(&["node", "srv/app.js"]), "app");
        assert_eq!(name(&["python3", "-m", "http.server"]), "python3");
        assert_eq!(name(&["./serve"]), "serve");
    }

    #[test]
    fn env_tables_are_chosen_and_unknown_keys_refused() {
        let file: File =
            toml::from_str("[env]\nA = \"1\"\nB = \"2\"\n[env.production]\nB = \"3\"\n").expect("valid toml");
        let env = environment(file.env.unwrap(), Some("production"), "f").unwrap();
        assert_eq!(env, vec![("A".into(), "1".into()), ("B".into(), "3".into())]);
        let file: File = toml::from_str("[env]\nA = \"1\"\n").unwrap();
        assert!(environment(file.env.unwrap(), Some("staging"), "f").unwrap_err().0.contains("[env.staging]"));
        let error = toml::from_str::<File>("workerz = 2\n").unwrap_err().to_string();
        assert!(error.contains("workerz"), "{error}");
    }
}
