//! The command line: every subcommand, flag and environment variable of `farm`
//! (clap derive). Also the source of `farm completions` and the man page.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Shown after `farm --help`: exit codes and where settings come from.
const MAIN_AFTER_HELP: &str = "\
Settings: --coordinator, --key and --ca-cert come from the flag, else the
environment (FARM_COORDINATOR, FARM_KEY, FARM_CA_CERT), else the config file
($XDG_CONFIG_HOME/nix-farm/config.toml or ~/.config/nix-farm/config.toml, or
--config / FARM_CONFIG), else the defaults (http://127.0.0.1:7070;
~/.ssh/id_ed25519 when it exists, else the client key `farm up` generated in
its default state directory). The config file takes the same names:
    coordinator = \"https://farm.example.org:7070\"
    key = \"/home/me/.ssh/id_ed25519\"
    ca-cert = \"/etc/nix-farm/ca.pem\"

Authentication: each call is signed with the SSH ed25519 key (--key).
Reading needs a key in one of the coordinator's key files (--read-keys and up);
building one in --authorized-keys; recording a build under a job (build --job) one in --push-keys; drain, undrain and cancel one in --admin-keys.

Exit status: 0 success; 1 a build failed; 2 usage error (flags, config, key,
an installable that does not evaluate); 3 the farm is unreachable or refused
the call; 130 interrupted.";

const STATUS_AFTER_HELP: &str = "\
JSON (--json; with --watch one document per line):
  {\"builders\": [{\"name\", \"state\": \"idle\"|\"busy\"|\"draining\"|\"offline\",
                 \"systems\": [..], \"supported_features\": [..], \"mandatory_features\": [..],
                 \"running_jobs\", \"max_jobs\", \"speed_factor\", \"cores\",
                 \"load\" (1-minute load average), \"load_5\",
                 \"memory_bytes\", \"memory_available_bytes\", \"disk_free_bytes\",
                 \"cpu_pressure\", \"memory_pressure\", \"io_pressure\" (percent, null when unknown),
                 \"store_problem\" (why it takes no jobs: its store is tainted; null when none),
                 \"last_seen\" (unix seconds, null if never), \"nix_version\", \"public_key\"}],
   \"queue\": [{\"system\", \"queued\"}], \"queued_total\",
   \"running\": [{\"build_id\", \"drv_path\", \"builder\", \"started\" (unix seconds), \"elapsed_secs\"}],
   \"recent_failures\": [{\"build_id\", \"drv_path\", \"builder\", \"error\", \"finished\"}]}";

const JOBS_AFTER_HELP: &str = "\
A named job is what `farm build --job NAME ...` records: each such build is a
run of NAME, with its state (building, succeeded, failed, cancelled), when it
started and ended and the outputs of what it was asked to build. The farm
keeps the last runs of each job (farm-coordinator --job-history, default 50)
and up to --max-jobs jobs (default 1000; a new name past it forgets the job
least recently run). Recording under a job needs a key with the push level
(--push-keys and up: a job's badge is public); reading them, one that may read.

Badges: the coordinator's HTTP listener (the cache's URL) serves
/badge/NAME.svg and /badge/NAME.json (a shields.io endpoint) without a key:
passing, failing, building or unknown.

JSON (--json):
  farm jobs:      {\"jobs\": [{\"name\", \"state\", \"submission_id\",
                   \"started\", \"finished\" (unix seconds or null),
                   \"duration_secs\" (or null), \"outputs\" (how many), \"runs\"}]}
  farm jobs NAME: {\"name\", \"runs\": [{\"submission_id\", \"state\", \"started\",
                   \"finished\", \"duration_secs\", \"drv_paths\": [..],
                   \"outputs\": [..], \"built\", \"cached\", \"failed\"}]} (newest first)
An unknown NAME is an error (exit 2).";

const BUILD_AFTER_HELP: &str = "\
INSTALLABLES: a store derivation (/nix/store/…-x.drv), a Nix file (with -A,
--arg, --argstr; evaluated with nix-instantiate), or a flake reference
(.#checks.x86_64-linux.foo; evaluated with `nix path-info --derivation`).

Only .drv files and sources the farm lacks are uploaded; nothing is downloaded
unless --copy-out or --out-link asks for it.

JSON (--json, on stdout, once at the end):
  {\"submission_id\", \"success\": bool,
   \"derivations\": [{\"drv_path\", \"requested\": bool,
                     \"outcome\": \"built\"|\"cached\"|\"failed\"|\"dependency_failed\"|
                                \"cancelled\"|\"timed_out\"|\"unschedulable\"|\"not_built\",
                     \"outputs\": {\"out\": \"/nix/store/…\", …},
                     \"builder\" (or null), \"error\" (or null),
                     \"start_time\", \"stop_time\" (unix seconds or null)}],
   \"uploaded\": {\"paths\", \"bytes\"}}
With --detach: {\"submission_id\"}.

Exit status: 0 all built, 1 a build failed, 2 usage error, 3 farm unreachable
or refused, 130 interrupted (what was submitted is cancelled unless --detach).";

/// `farm`: see and drive a nix-farm build farm.
#[derive(Debug, Parser)]
#[command(
    name = "farm",
    version,
    about = "See and drive a nix-farm build farm",
    after_long_help = MAIN_AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the coordinator and who we are.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Coordinator gRPC URL (http://host:port on loopback, https://host:port elsewhere) [default: http://127.0.0.1:7070].
    #[arg(long, env = "FARM_COORDINATOR", global = true, value_name = "URL")]
    pub coordinator: Option<String>,
    /// SSH ed25519 private key proving who you are [default: ~/.ssh/id_ed25519].
    #[arg(long, env = "FARM_KEY", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// PEM certificate (or CA) of the coordinator, for https:// [default: none].
    #[arg(long, env = "FARM_CA_CERT", global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Allow plaintext http:// to a non-loopback coordinator. Insecure: the
    /// traffic (logs, NARs, what you build) is readable and alterable on the way.
    #[arg(long, env = "FARM_INSECURE_PLAINTEXT", global = true, action = ArgAction::SetTrue)]
    pub insecure_plaintext: bool,
    /// Config file [default: $XDG_CONFIG_HOME/nix-farm/config.toml].
    #[arg(long, env = "FARM_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Builders, queue, running builds and recent failures.
    #[command(after_long_help = STATUS_AFTER_HELP)]
    Status(StatusArgs),
    /// Build installables on the farm (the CI entry point).
    #[command(after_long_help = BUILD_AFTER_HELP)]
    Build(BuildArgs),
    /// Named jobs (`farm build --job NAME`): each one's last run, or one's history.
    #[command(after_long_help = JOBS_AFTER_HELP)]
    Jobs(JobsArgs),
    /// Print a build's log (by build id or derivation path).
    Logs(LogsArgs),
    /// Cancel a build or a whole submission (admin).
    Cancel(CancelArgs),
    /// Let a builder finish its running builds and take no new ones (admin).
    Drain(DrainArgs),
    /// Let a drained builder take builds again (admin).
    Undrain(DrainArgs),
    /// The /etc/nix/machines line and nix.conf lines that point Nix at this farm.
    Machines(MachinesArgs),
    /// Print a single-use admin login link for the web dashboard (admin).
    #[command(after_long_help = DASHBOARD_AFTER_HELP)]
    Dashboard(DashboardArgs),
    /// Generate and rotate keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a coordinator and one builder using the local Nix, in one process.
    #[command(after_long_help = UP_AFTER_HELP)]
    Up(UpArgs),
    /// Relay a Nix session to a local farm's relay socket (what the machines
    /// line `farm up` prints runs; Nix appends `--stdio` or `--serve --write`).
    #[command(hide = true)]
    NixRelay(NixRelayArgs),
    /// Show the settings in effect and where each comes from.
    Config,
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Write the man pages (farm.1, farm-build.1, …) to a directory.
    Man(ManArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print JSON for programs (format below).
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, short = 'w', value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
}

/// How urgent a submission is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    Ci,
    Interactive,
}

#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// What to build: .drv paths, a .nix file, or flake references.
    #[arg(required = true, value_name = "INSTALLABLE")]
    pub installables: Vec<String>,
    /// Attribute of a .nix file to build (repeatable).
    #[arg(short = 'A', long = "attr", value_name = "ATTR")]
    pub attrs: Vec<String>,
    /// Pass NAME = EXPR to the .nix file's function.
    #[arg(long = "arg", num_args = 2, value_names = ["NAME", "EXPR"], action = ArgAction::Append)]
    pub args: Vec<String>,
    /// Pass NAME = "STRING" to the .nix file's function.
    #[arg(long = "argstr", num_args = 2, value_names = ["NAME", "STRING"], action = ArgAction::Append)]
    pub argstrs: Vec<String>,
    /// Print every build's log as it runs (failed builds' logs are always printed).
    #[arg(short = 'L', long = "print-build-logs")]
    pub print_build_logs: bool,
    /// Print each derivation's result and outputs as JSON on stdout (format below).
    #[arg(long)]
    pub json: bool,
    /// Download the outputs into the local store and make these GC roots (like nix-build).
    #[arg(short = 'o', long, value_name = "PATH")]
    pub out_link: Option<PathBuf>,
    /// Download the requested outputs (and their closure) into the local store.
    #[arg(long)]
    pub copy_out: bool,
    /// Submit, print the submission id and return; the builds go on.
    #[arg(long)]
    pub detach: bool,
    /// Scheduling priority.
    #[arg(long, value_enum, default_value = "ci")]
    pub priority: PriorityArg,
    /// Fail a build that prints nothing for SECS seconds [default: no limit].
    #[arg(long, value_name = "SECS")]
    pub max_silent_time: Option<u64>,
    /// Fail a build that runs longer than SECS seconds [default: no limit].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Progress as plain lines even on a terminal.
    #[arg(long)]
    pub no_progress_bar: bool,
    /// Record this build under the named job NAME (see `farm jobs --help`):
    /// 1-128 characters of letters, digits and . _ - / : + @, starting with
    /// a letter or digit, no empty, `.` or `..` segment between slashes.
    #[arg(long, value_name = "NAME", value_parser = parse_job_name)]
    pub job: Option<String>,
}

/// `--job NAME`: the shared rule (`farm_proto::job`), checked before anything
/// is evaluated or sent.
fn parse_job_name(s: &str) -> Result<String, String> {
    farm_proto::job::check_job_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// `farm jobs`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// A job's name: print its history instead of the list.
    #[arg(value_name = "NAME", value_parser = parse_job_name)]
    pub name: Option<String>,
    /// Print JSON for programs (format below).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Keep printing while the build runs.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// A build id, or a derivation path (/nix/store/…-x.drv).
    #[arg(value_name = "DRV|BUILD")]
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// A build id or a submission id.
    #[arg(value_name = "BUILD")]
    pub id: String,
}

const DASHBOARD_AFTER_HELP: &str = "\
The dashboard is served by the coordinator's HTTP listener (the cache's URL) at
/: builders, the queue and why it waits, running builds with their live logs,
submissions, recent failures and the cache. Anyone who reaches it may look;
draining a builder from it needs an admin session.

This command (signed with an --admin-keys key) asks the coordinator for a
random login token and prints the link http://HOST:PORT/login?token=... Open it
in a browser within the given time: the page exchanges the token (once; a second
use fails) for a session cookie (HttpOnly, SameSite=Strict) that lasts 12 hours
or until the coordinator restarts. Admin actions also carry a per-session CSRF
token and must come from the dashboard's own origin.";

#[derive(Debug, Clone, Args)]
pub struct DashboardArgs {
    /// Seconds the link may wait before it is used (1 to 120).
    #[arg(long, value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(1..=120))]
    pub expires_in: u32,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// The builder's name (as in `farm status`).
    #[arg(value_name = "BUILDER")]
    pub builder: String,
}

/// The machine URI scheme Nix uses to reach the farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    #[value(name = "ssh-ng")]
    SshNg,
    #[value(name = "ssh")]
    Ssh,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::SshNg => "ssh-ng",
            Protocol::Ssh => "ssh",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MachinesArgs {
    /// Machine URI scheme.
    #[arg(long, value_enum, default_value = "ssh-ng")]
    pub protocol: Protocol,
    /// Print {"machines_line", "nix_conf_lines": [..], "ssh_config"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a binary cache signing key (Nix format NAME:BASE64).
    Cache(CacheKeyArgs),
    /// Generate an SSH ed25519 key pair (OpenSSH format).
    Ssh(SshKeyArgs),
    /// Rotate a stopped coordinator's cache signing key: every narinfo in its
    /// local cache gets a signature by the new key beside the old one, then
    /// the new key takes over; trust both keys during the switch.
    RotateCache(RotateCacheArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CacheKeyArgs {
    /// The key's name (conventionally the cache's host name and a number, e.g. farm.example.org-1).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Write the secret key here (0600) and the public key to FILE.pub [default: print both].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct SshKeyArgs {
    /// Write the private key here (0600) and the public key to FILE.pub.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// Comment of the public key [default: user@host].
    #[arg(long, short = 'C')]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RotateCacheArgs {
    /// The coordinator's state directory (the coordinator must be stopped).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Name of the new key [default: the old name with its trailing number incremented].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The coordinator's local cache directory [default: STATE_DIR/cache].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Directory to write the pages to.
    #[arg(long, short = 'o', value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
}

/// Shown after `farm up --help`: who may use the farm it runs.
const UP_AFTER_HELP: &str = "\
Who may use it: farm up generates a client key (STATE/client/id_ed25519, 0600
in a 0700 directory) and grants it admin, as it does the running user's own
~/.ssh/id_*.pub keys; `farm` as that user finds the key with no settings.
Nix reaches it through the relay socket STATE/relay.sock, which admits only the
user who ran farm up and root (checked with SO_PEERCRED, and the directory is
0700): the printed machines line (ssh-ng://localhost?remote-program=…) runs
`farm nix-relay` locally, for that user's nix-build and for root's nix-daemon
alike. Every other local user is refused; give them keys (--read-keys,
--authorized-keys, --push-keys, --admin-keys) to use the gRPC and SSH endpoints.";

/// `farm nix-relay`: one Nix session over the relay socket.
#[derive(Debug, Clone, Args)]
pub struct NixRelayArgs {
    /// The relay socket (`farm up`: STATE/relay.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// What Nix asks the remote program for: `--stdio` (ssh-ng://) or
    /// `--serve --write` (ssh://), as Nix appends them.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "NIX_ARGS"
    )]
    pub nix_args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// State directory (coordinator state, cache, builder key) [default: $XDG_STATE_HOME/nix-farm, or ~/.local/state/nix-farm].
    #[arg(long, env = "FARM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7070].
    #[arg(long, env = "FARM_GRPC", value_name = "ADDR")]
    pub grpc: Option<String>,
    /// HTTP listen address (binary cache, metrics, dashboard) [default: 127.0.0.1:7080].
    #[arg(long, env = "FARM_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// SSH listen address (the Nix endpoint) [default: 127.0.0.1:7022].
    #[arg(long, env = "FARM_SSH", value_name = "ADDR")]
    pub ssh: Option<String>,
    /// Host name clients are told to use [default: the listen address, or the host name].
    #[arg(long, env = "FARM_PUBLIC_HOST", value_name = "HOST")]
    pub public_host: Option<String>,
    /// More clients that may only read: status, logs, the cache (OpenSSH
    /// authorized_keys format; farm up's own keys are admin already).
    #[arg(long, env = "FARM_READ_KEYS", value_name = "FILE")]
    pub read_keys: Option<PathBuf>,
    /// More clients that may build (Nix over SSH, `farm build`).
    #[arg(long, env = "FARM_AUTHORIZED_KEYS", value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// More clients whose uploads and hook-build outputs the farm signs.
    #[arg(long, env = "FARM_PUSH_KEYS", value_name = "FILE")]
    pub push_keys: Option<PathBuf>,
    /// More clients who may also drain and cancel.
    #[arg(long, env = "FARM_ADMIN_KEYS", value_name = "FILE")]
    pub admin_keys: Option<PathBuf>,
    /// More builders' public keys (they may join this farm too).
    #[arg(long, env = "FARM_BUILDER_KEYS", value_name = "FILE")]
    pub builder_keys: Option<PathBuf>,
    /// Name of the cache signing key generated on first start [default: the host name].
    #[arg(long, env = "FARM_CACHE_KEY_NAME", value_name = "NAME")]
    pub cache_key_name: Option<String>,
    /// Coordinator TOML config file (the farm-coordinator --config format).
    #[arg(long, value_name = "FILE")]
    pub coordinator_config: Option<PathBuf>,
    /// The local builder's name [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub builder_name: Option<String>,
    /// Builds the local builder runs at once [default: the local Nix's max-jobs].
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u32>,
    /// Systems the local builder advertises [default: probed from Nix].
    #[arg(long = "system", value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// Features the local builder supports [default: probed from Nix].
    #[arg(long = "feature", value_name = "FEATURE")]
    pub features: Vec<String>,
    /// The Nix store the local builder builds in [default on Linux:
    /// `local?root=STATE/builder-store`, a store of its own, so a
    /// `nix-build` through the printed machines line on this machine's
    /// store does not wait on its own output locks; on macOS, where Nix
    /// cannot build in such a store: Nix's default store]. `auto` means
    /// Nix's default store.
    #[arg(long, env = "FARM_BUILDER_STORE", value_name = "URI")]
    pub builder_store: Option<String>,
    /// Run no builder, only the coordinator.
    #[arg(long)]
    pub no_builder: bool,
}
