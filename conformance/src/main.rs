//! `tandem-conformance`: plays the Leader against a follower under test and
//! prints one line per case, `PASS name` or `FAIL name: why`.
//!
//! ```text
//! tandem-conformance --list
//! tandem-conformance [--case NAME]... [--socket PATH] [--token T] [--step-ms MS] -- COMMAND [ARGS]...
//! ```
//!
//! COMMAND is started once per case with `TANDEM_LEADER_SOCKET` and
//! `TANDEM_TOKEN` in its environment and spoken to through the driver
//! protocol (conformance/README.md). Exit code 0 when every case passed, 1
//! when one failed, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tandem_conformance::{CASES, Settings, run_case};

/// Plays the tandem Leader against a follower under test (see conformance/README.md).
#[derive(Debug, Parser)]
#[command(name = "tandem-conformance", version)]
struct Args {
    /// List the cases, one per line (`name - what it checks`), and exit.
    #[arg(long)]
    list: bool,
    /// Run only this case (repeatable). The default is every case.
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
    /// The Leader's socket path. The default is a new path in a private temporary directory per case.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The token the Leader requires (the child gets it as TANDEM_TOKEN). The default is `conformance-token`.
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// How long one step (a frame, a driver reply) may take, in milliseconds. The default is 5000.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    step_ms: u64,
    /// The follower under test, started once per case: `-- python3 -m tandem_follower.conformance`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for case in CASES {
            println!("{} - {}", case.name, case.about);
        }
        return ExitCode::SUCCESS;
    }
    if args.command.is_empty() {
        eprintln!(
            "tandem-conformance: give the follower under test after `--`, e.g. `-- python3 -m tandem_follower.conformance`"
        );
        return ExitCode::from(2);
    }
    let mut selected = Vec::new();
    for name in &args.cases {
        match CASES.iter().find(|case| case.name == name) {
            Some(case) => selected.push(*case),
            None => {
                eprintln!("tandem-conformance: no case named {name:?} (see --list)");
                return ExitCode::from(2);
            }
        }
    }
    if selected.is_empty() {
        selected = CASES.to_vec();
    }
    let mut settings =
        Settings { socket: args.socket, step: Duration::from_millis(args.step_ms), ..Settings::default() };
    if let Some(token) = args.token {
        settings.token = token;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandem-conformance: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = 0;
    for case in &selected {
        match runtime.block_on(run_case(case, &settings, &args.command)) {
            Ok(()) => println!("PASS {}", case.name),
            Err(why) => {
                failed += 1;
                println!("FAIL {}: {why}", case.name);
            }
        }
    }
    println!("{} passed, {failed} failed", selected.len() - failed);
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
