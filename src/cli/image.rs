//! `picocenter image`: building images from their definitions, and listing built images.

use anyhow::Context;
use picocenter_images::{BuildOptions, BuiltImage};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where Picocenter keeps its state when neither --state-dir nor PICOCENTER_STATE_DIR says.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/picocenter";

/// The state-directory option, shared by the subcommands that use the image cache.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDir {
    /// Where Picocenter keeps its state; built images live in <DIR>/images.
    #[arg(
        long = "state-dir",
        value_name = "DIR",
        env = "PICOCENTER_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        global = true
    )]
    state_dir: PathBuf,
}

impl StateDir {
    /// The state directory (also the image cache's `cache_dir`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

/// Arguments of `picocenter image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(flatten)]
    state: StateDir,

    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Build images from their definition folders (each holding an image.toml).
    ///
    /// Installs the Debian packages a definition names if dpkg says they are missing,
    /// assembles the root filesystem and records the app's configuration. An image whose
    /// inputs have not changed since its last build is left as it is.
    Build(BuildArgs),
    /// List the built images: name, size, build time (UTC) and entrypoint.
    Ls,
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Rebuild even the images that are up to date.
    #[arg(long)]
    force: bool,

    /// Image definition folders, such as images/hello; the folder's name is the image's.
    #[arg(value_name = "DIR", required = true)]
    dirs: Vec<PathBuf>,
}

/// Runs `picocenter image` and returns the exit status.
pub fn image(args: ImageArgs) -> anyhow::Result<i32> {
    let state = args.state.state_dir();
    match args.command {
        ImageCommand::Build(build) => build_images(&build, state),
        ImageCommand::Ls => list_images(state),
    }
}

fn build_images(args: &BuildArgs, state: &Path) -> anyhow::Result<i32> {
    let options = BuildOptions { force: args.force };
    for dir in &args.dirs {
        let started = Instant::now();
        let image = picocenter_images::build_with(dir, state, &options)
            .with_context(|| format!("building the image in {}", dir.display()))?;
        let status = if image.rebuilt { "built" } else { "up to date" };
        println!(
            "{}: {status} in {:.3}s: {}",
            image.meta.name,
            started.elapsed().as_secs_f64(),
            image.rootfs.display()
        );
    }
    Ok(0)
}

fn list_images(state: &Path) -> anyhow::Result<i32> {
    let images = picocenter_images::list(state)
        .with_context(|| format!("listing the images in {}", state.display()))?;
    let mut rows = vec![["NAME", "SIZE", "BUILT (UTC)", "ENTRYPOINT"].map(String::from)];
    rows.extend(images.iter().map(row));
    let widths: Vec<usize> = (0..3)
        .map(|column| rows.iter().map(|r| r[column].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        println!(
            "{:w0$}  {:>w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(0)
}

fn row(image: &BuiltImage) -> [String; 4] {
    [
        image.meta.name.clone(),
        human_size(image.meta.size_bytes),
        utc_time(image.meta.built_at),
        image.meta.run.argv.join(" "),
    ]
}

/// A size in B, KiB, MiB or GiB, with one decimal above bytes.
fn human_size(bytes: u64) -> String {
    let units = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the Unix epoch.
fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
