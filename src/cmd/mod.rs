//! The command layer: what each command takes, how it runs, what it prints, and its exit
//! code. It lives in the binary, so the library (`docusearch_agent`) cannot import it: library
//! functions return typed results and reports, and the commands here print them as text or
//! JSON. `main.rs` parses the command line and calls [`run`].

mod agent;
mod doctor;
mod embed;
mod search;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use docusearch_agent::config::Config;
use docusearch_agent::logging::LogDestination;

#[derive(Debug, Parser)]
#[command(
    name = "docusearch-agent",
    version,
    about = "Keeps a DocuSearch index (ColPali + ChromaDB) in sync with watched folders",
    propagate_version = true
)]
pub struct Cli {
    /// Configuration file (default: the platform's config location, when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch folders and keep the index current (what launchd/systemd start).
    Run(RunArgs),
    /// Index files or folders once, with progress, then exit.
    Index(IndexArgs),
    /// Search the index.
    Search(SearchArgs),
    /// Show what is indexed, queued and failed.
    Status(StatusArgs),
    /// Check the configuration, PDFium, Chroma, the model and the device; print the fixes.
    Doctor(DoctorArgs),
    /// Install, remove or inspect the launchd agent / systemd user unit.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Embed images and queries with ColPali and print the vectors.
    Embed(EmbedArgs),
    /// Check the index for records the server lost, and rebuild what is broken.
    Repair(RepairArgs),
    /// Manage the model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Internal: the isolated renderer process (started by the agent itself).
    #[command(hide = true)]
    ExtractWorker,
    /// Internal: parity and speed of ColPali on this machine's GPU (scripts/gpu-check runs it).
    #[command(hide = true)]
    GpuCheck(GpuCheckArgs),
}

impl Command {
    /// Whether the command may run ColPali (and so needs candle's CPU thread settings).
    pub fn runs_the_model(&self) -> bool {
        matches!(
            self,
            Command::Run(_)
                | Command::Index(_)
                | Command::Search(_)
                | Command::Embed(_)
                | Command::GpuCheck(_)
        )
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Folders to watch, replacing the configured ones.
    pub folders: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// Files or folders to index.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SearchMode {
    Hybrid,
    Visual,
    Text,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    pub query: String,
    /// Results to print.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = SearchMode::Hybrid)]
    pub mode: SearchMode,
    /// Candidates fetched per collection for exact re-scoring.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    #[arg(long)]
    pub json: bool,
    /// Print the time of each stage.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the launchd plist / systemd unit and load it.
    Install {
        /// Print the file and the commands without touching anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Unload and remove the service.
    Uninstall {
        #[arg(long)]
        dry_run: bool,
    },
    /// Whether the service is installed and running.
    Status,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Repo id or local directory (default: the configured model).
    #[arg(long)]
    pub model: Option<String>,
    /// Image files to embed as document pages.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Queries to embed.
    #[arg(long = "query", value_name = "TEXT")]
    pub queries: Vec<String>,
    /// Print one JSON object with every vector and the MaxSim scores.
    #[arg(long)]
    pub json: bool,
    /// Embed each image and query on its own and report the seconds of the load and of each
    /// (scripts/bench_fullsize reads them).
    #[arg(long)]
    pub timings: bool,
}

fn parse_device(s: &str) -> Result<docusearch_agent::config::DeviceChoice, String> {
    docusearch_agent::config::DeviceChoice::parse(s)
        .ok_or_else(|| format!("`{s}` is not a device: auto, cpu, cuda or metal"))
}

#[derive(Debug, Args)]
pub struct GpuCheckArgs {
    /// Where to run: `cuda` on the GPU machine; `cpu` to try the check anywhere.
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    pub device: docusearch_agent::config::DeviceChoice,
    /// The folder with tiny-colpali/ and colpali-reference/ (the repo's tests/fixtures).
    #[arg(long, value_name = "DIR")]
    pub fixtures: PathBuf,
    /// config.json giving the sizes of the speed runs (default: the real model's, under
    /// FIXTURES/colpali-v1.2-merged/).
    #[arg(long, value_name = "FILE")]
    pub size_config: Option<PathBuf>,
    /// Page batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub batches: Vec<usize>,
    /// Queries per timed batch.
    #[arg(long, default_value_t = 16)]
    pub query_batch: usize,
    /// Timed runs per batch size (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Documents to render with PDFium and embed.
    #[arg(long = "document", value_name = "FILE")]
    pub documents: Vec<PathBuf>,
    /// At most this many of their pages.
    #[arg(long, default_value_t = 32)]
    pub max_pages: usize,
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Report what would be done without changing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download the model into the Hugging Face cache ahead of time.
    Fetch {
        /// Repo id (default: the configured model).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        revision: Option<String>,
    },
}

/// What every command gets: the validated configuration and where it came from.
pub struct Context {
    pub config: Config,
    pub config_path: Option<PathBuf>,
}

/// Loads the configuration, sets up logging and runs the command.
pub fn run(cli: Cli) -> ExitCode {
    // The renderer child speaks a binary protocol on stdout and needs no configuration.
    if let Command::ExtractWorker = cli.command {
        return docusearch_agent::extract::worker_main();
    }
    let env = |k: &str| std::env::var(k).ok();
    let config = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            // `doctor` reports a bad configuration as one of its checks.
            if let Command::Doctor(_) = cli.command {
                return doctor::run_with_config_error(cli.config.as_deref(), &e);
            }
            eprintln!("error: {e}");
            return ExitCode::from(78); // EX_CONFIG: launchd/systemd show it as a config error
        }
    };
    let log = docusearch_agent::logging::init(&config.logging);
    let ctx = Context {
        config,
        config_path: cli.config.clone(),
    };
    let result = match cli.command {
        Command::Run(a) => agent::run_command(&ctx, a),
        Command::Index(a) => agent::index_command(&ctx, a),
        Command::Status(a) => agent::status_command(&ctx, a),
        Command::Search(a) => search::search_command(&ctx, a),
        Command::Repair(a) => search::repair_command(&ctx, a),
        Command::Doctor(_) => doctor::run(&ctx),
        Command::Service(c) => service::service_command(&ctx, c),
        Command::Embed(a) => embed::embed_command(&ctx, a),
        Command::Model(ModelCommand::Fetch { model, revision }) => {
            embed::fetch_command(&ctx, model, revision)
        }
        Command::GpuCheck(a) => embed::gpu_check_command(&ctx, a),
        Command::ExtractWorker => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let text = docusearch_agent::errors::describe(e.as_ref());
            // Once on stderr: a log that goes there already would say it a second time.
            if log != LogDestination::Stderr {
                tracing::error!("{text}");
            }
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime of a command that runs the pipeline or many requests at once (`run`, `index`,
/// `search`, `repair`): two worker threads, which is what the pipeline's async stages need.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The runtime of a command that makes a request or two (`status`, `doctor`, `service status`,
/// `index` handing paths to the running agent).
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
