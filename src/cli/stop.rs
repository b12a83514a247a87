//! `picocenter stop`.

use super::image::StateDir;
use anyhow::{bail, Context};
use picocenter_vmm::control::{self, Request};
use std::io::Read;
use std::time::Duration;

/// Arguments of `picocenter stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The app to stop (its name, as `picocenter run --name` or the image gave it).
    pub name: String,

    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub grace: f64,

    #[command(flatten)]
    pub state: StateDir,
}

/// Sends SIGTERM to a running app, then SIGKILL after the grace period, and waits until it
/// is gone.
pub fn stop(args: StopArgs) -> anyhow::Result<i32> {
    let path = super::run::control_socket(&args.state.state_dir().join("run"), &args.name)?;
    let grace = Duration::try_from_secs_f64(args.grace).context("--grace must be positive")?;
    let request = Request::Stop {
        grace_ms: grace.as_millis() as u64,
    };
    let (reply, mut stream) = control::request(&path, &request)
        .with_context(|| format!("no running app named {} ({})", args.name, path.display()))?;
    let answer: serde_json::Value =
        serde_json::from_str(&reply).with_context(|| format!("bad reply: {reply}"))?;
    if answer["ok"] != serde_json::Value::Bool(true) {
        bail!("{} refused to stop: {}", args.name, reply.trim());
    }
    // The VMM closes the connection when it exits.
    stream.set_read_timeout(Some(grace + Duration::from_secs(10)))?;
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {
            eprintln!("{} stopped", args.name);
            Ok(0)
        }
        Err(e) => bail!(
            "{} did not stop within {:?}: {e}",
            args.name,
            grace + Duration::from_secs(10)
        ),
    }
}
